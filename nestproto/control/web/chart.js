// History of one thermostat (issues 13 and 15): temperature and target over
// 24 hours or 7 days with heating and cooling bands, and daily usage bars.
// Drawn here as SVG from /api/history and /api/usage; no library.

import { element } from "./dom.js";
import { formatTemperature, toScale } from "./units.js";

const SVG = "http://www.w3.org/2000/svg";
const HOUR_MS = 3600 * 1000;
const DAY_MS = 24 * HOUR_MS;
const REFRESH_MS = 5 * 60 * 1000;
// The HVAC fields of each band, as /api/usage counts them (nestproto.history.USAGE).
const HEATING = [
  "hvac_heater_state",
  "hvac_heat_x2_state",
  "hvac_heat_x3_state",
  "hvac_alt_heat_state",
  "hvac_alt_heat_x2_state",
];
const COOLING = ["hvac_ac_state", "hvac_cool_x2_state", "hvac_cool_x3_state"];
const USAGE = [
  ["heating", "Heating"],
  ["cooling", "Cooling"],
  ["fan", "Fan"],
  ["aux", "Aux heat"],
];
const RANGES = [
  ["day", "24 hours"],
  ["week", "7 days"],
];
// The chart's own coordinates; it scales to the card's width.
const W = 320;
const H = 170;
const PAD = { left: 34, right: 6, top: 8, bottom: 20 };

let chartCount = 0;

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

function minutesText(minutes) {
  const rounded = Math.round(minutes);
  if (rounded < 60) return `${rounded} min`;
  return `${Math.floor(rounded / 60)} h ${rounded % 60} min`;
}

// Spans [from, to) during which any of `fields` was on.
export function spans(document, fields) {
  const state = {};
  for (const field of fields) state[field] = Boolean(document.hvac_at_from?.[field]);
  const result = [];
  let start = fields.some((f) => state[f]) ? document.from : null;
  for (const change of document.transitions || []) {
    if (!fields.includes(change.field)) continue;
    state[change.field] = change.on;
    const on = fields.some((f) => state[f]);
    if (on && start === null) start = change.time;
    else if (!on && start !== null) {
      result.push([start, change.time]);
      start = null;
    }
  }
  if (start !== null) result.push([start, document.to]);
  return result;
}

// The points and bands of a history document, whatever its step.
export function series(document) {
  const hourly = document.step === "hourly";
  const rows = hourly
    ? (document.hours || []).map((hour) => ({
        time: hour.time + HOUR_MS / 2,
        temperature: hour.temperature?.mean ?? null,
        target: hour.target?.mean ?? null,
        target_low: hour.target_low?.mean ?? null,
        target_high: hour.target_high?.mean ?? null,
      }))
    : document.samples || [];
  let heating;
  let cooling;
  if (hourly) {
    // An hour's band is as wide as the minutes it ran.
    const band = (name) =>
      (document.hours || [])
        .filter((hour) => (hour.minutes_on?.[name] || 0) > 0)
        .map((hour) => [hour.time, hour.time + hour.minutes_on[name] * 60000]);
    heating = band("heating");
    cooling = band("cooling");
  } else {
    heating = spans(document, HEATING);
    cooling = spans(document, COOLING);
  }
  return { rows, heating, cooling, gapMs: hourly ? 2 * HOUR_MS : 15 * 60000 };
}

function path(rows, name, x, y, gapMs) {
  let d = "";
  let last = null;
  for (const row of rows) {
    const value = row[name];
    if (value == null) {
      last = null;
      continue;
    }
    const move = last === null || row.time - last > gapMs;
    d += `${move ? "M" : "L"}${x(row.time).toFixed(1)},${y(value).toFixed(1)}`;
    last = row.time;
  }
  return d;
}

function timeLabel(ms, range) {
  const date = new Date(ms);
  if (range === "week") return date.toLocaleDateString(undefined, { weekday: "short" });
  return `${String(date.getHours()).padStart(2, "0")}:00`;
}

function totalMinutes(bands) {
  return bands.reduce((sum, [from, to]) => sum + (to - from) / 60000, 0);
}

export function drawTemperatures(document, scale, range) {
  const id = `chart-${++chartCount}`;
  const { rows, heating, cooling, gapMs } = series(document);
  const names = ["temperature", "target", "target_low", "target_high"];
  const values = rows.flatMap((row) => names.map((n) => row[n]).filter((v) => v != null));
  const shown = values.map((v) => toScale(v, scale));
  const step = scale === "F" ? 5 : 2;
  const low = shown.length ? Math.floor((Math.min(...shown) - 0.5) / step) * step : 15;
  let high = shown.length ? Math.ceil((Math.max(...shown) + 0.5) / step) * step : 25;
  if (high <= low) high = low + step;
  const from = document.from;
  const to = document.to;
  const x = (ms) => PAD.left + ((ms - from) / (to - from)) * (W - PAD.left - PAD.right);
  const y = (celsius) =>
    PAD.top + ((high - toScale(celsius, scale)) / (high - low)) * (H - PAD.top - PAD.bottom);
  const yShown = (value) => PAD.top + ((high - value) / (high - low)) * (H - PAD.top - PAD.bottom);

  const what = range === "week" ? "7 days" : "24 hours";
  const temperatures = rows.map((r) => r.temperature).filter((v) => v != null);
  const summary = temperatures.length
    ? `Temperature between ${formatTemperature(Math.min(...temperatures), scale)} and ` +
      `${formatTemperature(Math.max(...temperatures), scale)}, ` +
      `now ${formatTemperature(temperatures[temperatures.length - 1], scale)}. ` +
      `Heating ran ${minutesText(totalMinutes(heating))}, cooling ${minutesText(totalMinutes(cooling))}.`
    : "No temperatures recorded in this period yet.";
  const chart = svg(
    "svg",
    {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-labelledby": `${id}-title ${id}-desc`,
      class: "chart",
    },
    svg("title", { id: `${id}-title` }, `Temperature and target, last ${what}`),
    svg("desc", { id: `${id}-desc` }, summary),
  );
  const clip = (ms) => Math.min(Math.max(ms, from), to);
  for (const [bands, kind] of [
    [heating, "heating"],
    [cooling, "cooling"],
  ]) {
    for (const [start, end] of bands) {
      const left = x(clip(start));
      const width = Math.max(x(clip(end)) - left, 0.5);
      chart.append(
        svg("rect", {
          class: `band ${kind}`,
          x: left.toFixed(1),
          y: PAD.top,
          width: width.toFixed(1),
          height: H - PAD.top - PAD.bottom,
        }),
      );
    }
  }
  for (let value = low; value <= high; value += step) {
    const at = yShown(value).toFixed(1);
    chart.append(
      svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: at, y2: at }),
      svg("text", { class: "axis", x: PAD.left - 3, y: at, "text-anchor": "end", "dominant-baseline": "middle" }, `${value}°`),
    );
  }
  // Time ticks: every 6 hours, or every local midnight.
  const tick = range === "week" ? DAY_MS : 6 * HOUR_MS;
  const first = new Date(from);
  first.setMinutes(0, 0, 0);
  if (range === "week") first.setHours(0);
  else first.setHours(Math.ceil(first.getHours() / 6) * 6);
  for (let ms = first.getTime(); ms <= to; ms += tick) {
    if (ms < from) continue;
    const at = x(ms);
    chart.append(
      svg("line", { class: "grid", x1: at.toFixed(1), x2: at.toFixed(1), y1: PAD.top, y2: H - PAD.bottom }),
    );
    if (at < W - PAD.right - 12) {
      chart.append(
        svg("text", { class: "axis", x: (at + 2).toFixed(1), y: H - 6 }, timeLabel(ms, range)),
      );
    }
  }
  for (const [name, kind] of [
    ["target", "target"],
    ["target_low", "target heat-to"],
    ["target_high", "target cool-to"],
    ["temperature", "temperature"],
  ]) {
    const d = path(rows, name, x, y, gapMs);
    if (d) chart.append(svg("path", { class: `line ${kind}`, d }));
  }
  return chart;
}

export function drawUsage(document) {
  const id = `usage-${++chartCount}`;
  const days = document.days || [];
  const most = Math.max(60, ...days.flatMap((day) => USAGE.map(([name]) => day[name] || 0)));
  const hours = Math.ceil(most / 60);
  const top = hours * 60;
  const height = 110;
  const bottom = 18;
  const left = 34;
  const slot = (W - left - PAD.right) / Math.max(days.length, 1);
  const bar = Math.max((slot - 6) / USAGE.length, 1);
  const y = (minutes) => PAD.top + (1 - minutes / top) * (height - PAD.top - bottom);
  const summary = days.length
    ? days
        .map(
          (day) =>
            `${day.date}: ` +
            USAGE.map(([name, label]) => `${label.toLowerCase()} ${minutesText(day[name] || 0)}`).join(", "),
        )
        .join("; ") + "."
    : "No usage recorded yet.";
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${height}`, role: "img", "aria-labelledby": `${id}-title ${id}-desc`, class: "chart usage" },
    svg("title", { id: `${id}-title` }, `Daily usage, last ${days.length} days`),
    svg("desc", { id: `${id}-desc` }, summary),
  );
  const every = hours <= 4 ? 1 : Math.ceil(hours / 4);
  for (let hour = 0; hour <= hours; hour += every) {
    const at = y(hour * 60).toFixed(1);
    chart.append(
      svg("line", { class: "grid", x1: left, x2: W - PAD.right, y1: at, y2: at }),
      svg("text", { class: "axis", x: left - 3, y: at, "text-anchor": "end", "dominant-baseline": "middle" }, `${hour} h`),
    );
  }
  days.forEach((day, i) => {
    const x0 = left + i * slot + 3;
    USAGE.forEach(([name, label], j) => {
      const minutes = day[name] || 0;
      if (minutes <= 0) return;
      chart.append(
        svg(
          "rect",
          { class: `bar ${name}`, x: (x0 + j * bar).toFixed(1), y: y(minutes).toFixed(1), width: bar.toFixed(1), height: (y(0) - y(minutes)).toFixed(1) },
          svg("title", {}, `${day.date} ${label.toLowerCase()}: ${minutesText(minutes)}`),
        ),
      );
    });
    const weekday = new Date(`${day.date}T12:00:00`).toLocaleDateString(undefined, { weekday: "short" });
    chart.append(svg("text", { class: "axis", x: (x0 + (slot - 6) / 2).toFixed(1), y: height - 5, "text-anchor": "middle" }, weekday));
  });
  return chart;
}

// The history part of a thermostat's card.
export function makeHistory(serial, api) {
  const history = { range: "day", scale: "C", temperatures: null, usage: null, off: false };
  const buttons = new Map();
  const group = element("div", { class: "row", role: "group", "aria-label": "History period" });
  for (const [range, label] of RANGES) {
    const button = element("button", {
      type: "button",
      "aria-pressed": String(range === history.range),
      text: label,
      onclick: () => {
        history.range = range;
        for (const [name, other] of buttons) other.setAttribute("aria-pressed", String(name === range));
        load();
      },
    });
    buttons.set(range, button);
    group.append(button);
  }
  const temperatures = element("div", { class: "chart-box" });
  const usage = element("div", { class: "chart-box" });
  const legend = element(
    "p",
    { class: "legend muted" },
    ...[
      ["temperature", "Temperature"],
      ["target", "Target"],
      ["heating", "Heating"],
      ["cooling", "Cooling"],
    ].map(([kind, label]) => element("span", { class: `key key-${kind}`, text: label })),
  );
  const usageLegend = element(
    "p",
    { class: "legend muted" },
    ...USAGE.map(([kind, label]) => element("span", { class: `key key-${kind}`, text: label })),
  );
  const message = element("p", { class: "muted", role: "status" });
  history.root = element(
    "section",
    { class: "history", "aria-label": "History", hidden: "" },
    element("h4", { text: "History" }),
    group,
    temperatures,
    legend,
    element("h4", { text: "Daily usage" }),
    usage,
    usageLegend,
    message,
  );

  function render() {
    if (history.temperatures) {
      temperatures.replaceChildren(drawTemperatures(history.temperatures, history.scale, history.range));
    }
    if (history.usage) usage.replaceChildren(drawUsage(history.usage));
  }

  async function load() {
    if (history.off) return;
    const now = Date.now();
    const query =
      history.range === "week"
        ? `api/history?serial=${encodeURIComponent(serial)}&step=hourly&from=${now - 7 * DAY_MS}`
        : `api/history?serial=${encodeURIComponent(serial)}`;
    try {
      const [document, days] = await Promise.all([
        api(query),
        api(`api/usage?serial=${encodeURIComponent(serial)}&days=7`),
      ]);
      history.temperatures = document;
      history.usage = days;
      message.textContent = "";
      history.root.hidden = false;
      render();
    } catch (e) {
      if (e.status === 404) {
        // No history on this server (--no-history): no chart at all.
        history.off = true;
        history.root.hidden = true;
      } else {
        message.textContent = `History unavailable: ${e.message}`;
      }
    }
  }

  history.update = (status) => {
    const scale = status.temperature_scale === "F" ? "F" : "C";
    if (scale !== history.scale) {
      history.scale = scale;
      render();
    }
  };
  history.load = load;
  const timer = setInterval(() => {
    // A card removed (its device deleted) stops asking.
    if (history.root.isConnected) load();
    else clearInterval(timer);
  }, REFRESH_MS);
  return history;
}
