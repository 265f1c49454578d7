// The week view of schedule.SERIAL: add, move and remove setpoints, save
// through set_schedule; validation errors are shown next to their entry.

import { element } from "./dom.js";
import { celsiusFrom, roundShown, scaleStep } from "./units.js";

export const DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MIN_CELSIUS = 4.5;
const MAX_CELSIUS = 32;

function clock(seconds) {
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return `${String(h).padStart(2, "0")}:${String(m).padStart(2, "0")}`;
}

function seconds(text) {
  const match = /^(\d{1,2}):(\d{2})$/.exec(text || "");
  if (!match) return null;
  const value = Number(match[1]) * 3600 + Number(match[2]) * 60;
  return value <= 86399 ? value : null;
}

function listOf(container) {
  if (Array.isArray(container)) return container.slice();
  if (!container || typeof container !== "object") return [];
  return Object.keys(container)
    .sort((a, b) => Number(a) - Number(b))
    .map((key) => container[key]);
}

export function setupSchedule({ api, command }) {
  const section = document.getElementById("schedule");
  const picker = document.getElementById("schedule-device");
  const modePicker = document.getElementById("schedule-mode");
  const week = document.getElementById("week");
  const message = document.getElementById("schedule-message");
  let serial = null;
  let scale = "C";
  let name = null;
  // days[d] = [{time, temp, "temp-min", "temp-max", error, ...}]
  let days = DAYS.map(() => []);

  function defaultEntry(time) {
    const mode = modePicker.value;
    if (mode === "RANGE") return { time, type: mode, entry_type: "setpoint", "temp-min": 19, "temp-max": 24 };
    return { time, type: mode, entry_type: "setpoint", temp: mode === "COOL" ? 24 : 20 };
  }

  function temperatureInput(entry, field, label) {
    const input = element("input", {
      type: "number",
      step: String(scaleStep(scale)),
      inputmode: "decimal",
      "aria-label": label,
      value: entry[field] == null ? "" : String(roundShown(entry[field], scale)),
    });
    input.addEventListener("change", () => {
      entry[field] = input.value === "" ? null : celsiusFrom(Number(input.value), scale);
    });
    return input;
  }

  function render() {
    const range = modePicker.value === "RANGE";
    week.replaceChildren(
      ...DAYS.map((dayName, day) => {
        const rows = days[day].map((entry, index) => {
          const label = `${dayName} setpoint ${index + 1}`;
          const errorId = `schedule-error-${day}-${index}`;
          const time = element("input", { type: "time", "aria-label": `${label} time`, value: clock(entry.time), "aria-describedby": errorId });
          time.addEventListener("change", () => {
            const value = seconds(time.value);
            if (value !== null) entry.time = value;
          });
          const move = element("select", { "aria-label": `${label} day` });
          DAYS.forEach((other, otherDay) => {
            const option = element("option", { value: String(otherDay), text: other.slice(0, 3) });
            if (otherDay === day) option.selected = true;
            move.append(option);
          });
          move.addEventListener("change", () => {
            days[day].splice(index, 1);
            days[Number(move.value)].push(entry);
            days[Number(move.value)].sort((a, b) => a.time - b.time);
            render();
          });
          const temperatures = range
            ? [temperatureInput(entry, "temp-min", `${label} heat to`), temperatureInput(entry, "temp-max", `${label} cool to`)]
            : [temperatureInput(entry, "temp", `${label} temperature`)];
          return element(
            "li",
            { class: entry.error ? "entry invalid" : "entry" },
            time,
            ...temperatures,
            element("span", { class: "unit", text: `°${scale}` }),
            move,
            element("button", {
              type: "button",
              "aria-label": `Remove ${label}`,
              text: "✕",
              onclick: () => {
                days[day].splice(index, 1);
                render();
              },
            }),
            element("span", { id: errorId, class: "error", role: entry.error ? "alert" : "note", text: entry.error || "" }),
          );
        });
        return element(
          "fieldset",
          { class: "day" },
          element("legend", { text: dayName }),
          element("ol", {}, ...rows),
          element("button", {
            type: "button",
            text: `Add setpoint to ${dayName}`,
            onclick: () => {
              const last = days[day].at(-1);
              days[day].push(defaultEntry(last ? Math.min(last.time + 3600, 86340) : 7 * 3600));
              render();
            },
          }),
        );
      }),
    );
  }

  function validate() {
    const range = modePicker.value === "RANGE";
    let valid = true;
    days.forEach((entries) => {
      const times = new Set();
      entries.forEach((entry) => {
        entry.error = "";
        const fields = range ? ["temp-min", "temp-max"] : ["temp"];
        for (const field of fields) {
          const value = entry[field];
          if (value == null || Number.isNaN(value)) entry.error = "Give a temperature.";
          else if (value < MIN_CELSIUS || value > MAX_CELSIUS)
            entry.error = `Temperature must be between ${roundShown(MIN_CELSIUS, scale)} and ${roundShown(MAX_CELSIUS, scale)} °${scale}.`;
        }
        if (!entry.error && range && entry["temp-min"] > entry["temp-max"]) entry.error = "Heat-to must not be above cool-to.";
        if (!entry.error && times.has(entry.time)) entry.error = "Another setpoint has this time.";
        times.add(entry.time);
        if (entry.error) valid = false;
      });
    });
    return valid;
  }

  function payload() {
    const mode = modePicker.value;
    const out = {};
    days.forEach((entries, day) => {
      out[String(day)] = entries.map((entry) => {
        const { error: _error, ...rest } = entry;
        return { ...rest, type: mode };
      });
    });
    return { ver: 2, name: name || "Default", schedule_mode: mode, days: out };
  }

  async function load() {
    message.textContent = "";
    if (serial === null) return;
    const answer = await api(`api/schedule?serial=${encodeURIComponent(serial)}`);
    const stored = answer.schedule || {};
    name = stored.name || null;
    const device = currentDevices.find((d) => d.serial === serial);
    scale = device ? device.temperature_scale : "C";
    const fallback = device && device.mode === "cool" ? "COOL" : device && device.mode === "range" ? "RANGE" : "HEAT";
    modePicker.value = stored.schedule_mode || device?.schedule_mode || fallback;
    const storedDays = stored.days || {};
    days = DAYS.map((_, day) =>
      listOf(storedDays[String(day)] ?? storedDays[day])
        .filter((entry) => entry && typeof entry === "object")
        .map((entry) => ({ ...entry }))
        .sort((a, b) => a.time - b.time),
    );
    render();
  }

  async function save() {
    message.textContent = "";
    days.forEach((entries) => entries.sort((a, b) => a.time - b.time));
    if (!validate()) {
      render();
      message.textContent = "Not saved: correct the setpoints marked.";
      return;
    }
    render();
    try {
      await command(serial, "set_schedule", payload());
      message.textContent = "Schedule saved.";
    } catch (e) {
      const where = /^day (\d+) entry (\d+): (.*)$/.exec(e.message);
      if (where && days[Number(where[1])]?.[Number(where[2])]) {
        days[Number(where[1])][Number(where[2])].error = where[3];
        render();
        message.textContent = "Not saved: correct the setpoint marked.";
      } else {
        message.textContent = `Not saved: ${e.message}`;
      }
    }
  }

  let currentDevices = [];
  picker.addEventListener("change", () => {
    serial = picker.value;
    load().catch((e) => (message.textContent = e.message));
  });
  modePicker.addEventListener("change", () => {
    const mode = modePicker.value;
    for (const entries of days) {
      entries.forEach((entry, index) => {
        const replacement = defaultEntry(entry.time);
        if (mode !== "RANGE" && entry.temp == null) entry.temp = replacement.temp;
        if (mode === "RANGE" && entry["temp-min"] == null) {
          entry["temp-min"] = entry.temp != null ? entry.temp : replacement["temp-min"];
          entry["temp-max"] = replacement["temp-max"];
        }
        entries[index] = { ...entry, type: mode };
      });
    }
    render();
  });
  document.getElementById("schedule-save").addEventListener("click", () => save());
  document.getElementById("schedule-reload").addEventListener("click", () => {
    load().catch((e) => (message.textContent = e.message));
  });

  return {
    devicesChanged(list) {
      currentDevices = list;
      section.hidden = list.length === 0;
      const serials = list.map((d) => d.serial);
      const shown = Array.from(picker.options).map((o) => o.value);
      if (serials.join() !== shown.join()) {
        picker.replaceChildren(
          ...list.map((d) => element("option", { value: d.serial, text: d.name || d.serial })),
        );
      }
      if (serial === null || !serials.includes(serial)) {
        serial = serials[0] ?? null;
        if (serial !== null) picker.value = serial;
        load().catch((e) => (message.textContent = e.message));
      }
    },
  };
}
