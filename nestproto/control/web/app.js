// The nestproto dashboard: plain ES module, no dependencies, no build step.
// Every URL is relative to the page's <base>, so the page works at /, under
// /k/<token>/ and behind Home Assistant's ingress prefix alike.

import { element } from "./dom.js";
import { celsiusFrom, formatTemperature, scaleStep, toScale } from "./units.js";
import { setupSchedule } from "./schedule.js";
import { makeHistory } from "./chart.js";

let csrf = null;
const cards = new Map();
let devices = [];
let refreshTimer = null;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let document = null;
  try {
    document = await response.json();
  } catch {
    document = null;
  }
  if (!response.ok || (document && document.success === false)) {
    const message =
      (document && (document.message || document.error)) ||
      `The server answered ${response.status}`;
    if (response.status === 401) showLogin();
    throw new ApiError(response.status, message);
  }
  return document;
}

export function command(serial, name, value) {
  return api("command", { method: "POST", body: { serial, command: name, value } });
}

// Login

function showLogin() {
  document.getElementById("app").hidden = true;
  document.getElementById("login").hidden = false;
  setConnection("Logged out", "off");
  const accounts = document.getElementById("account-form");
  document.getElementById(accounts.hidden ? "login-token" : "login-user").focus();
}

async function start() {
  const session = await api("api/session");
  csrf = session.csrf;
  document.getElementById("logout").hidden = !(session.login_required && csrf);
  document.getElementById("account-form").hidden = !session.accounts;
  const user = document.getElementById("user");
  user.hidden = !session.user;
  user.textContent = session.user ? `Logged in as ${session.user}` : "";
  if (!session.authenticated) {
    showLogin();
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("app").hidden = false;
  await Promise.all([refreshDevices(), refreshPairing()]);
  connectEvents();
}

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const field = document.getElementById("login-token");
  const error = document.getElementById("login-error");
  error.textContent = "";
  try {
    const answer = await api("api/login", { method: "POST", body: { token: field.value } });
    csrf = answer.csrf;
    field.value = "";
    await start();
  } catch (e) {
    error.textContent = e.status === 403 ? "That token is wrong." : e.message;
  }
});

document.getElementById("account-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = document.getElementById("login-user");
  const password = document.getElementById("login-password");
  const error = document.getElementById("account-error");
  error.textContent = "";
  try {
    const answer = await api("api/login", {
      method: "POST",
      body: { username: user.value, password: password.value },
    });
    csrf = answer.csrf;
    password.value = "";
    await start();
  } catch (e) {
    error.textContent = e.status === 403 ? "That account name or password is wrong." : e.message;
  }
});

document.getElementById("logout").addEventListener("click", async () => {
  await api("api/logout", { method: "POST", body: {} });
  csrf = null;
  if (events) events.close();
  location.reload();
});

// Live updates

let events = null;

function setConnection(text, state) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.dataset.state = state;
}

function connectEvents() {
  if (events) events.close();
  // EventSource reconnects by itself and sends Last-Event-ID; the server
  // replays what was missed, or sends "reset".
  events = new EventSource("api/events", { withCredentials: true });
  events.addEventListener("open", () => {
    setConnection("Live", "live");
    scheduleRefresh();
  });
  events.addEventListener("message", () => scheduleRefresh());
  events.addEventListener("reset", () => scheduleRefresh());
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED) {
      setConnection("Disconnected — retrying", "off");
      setTimeout(() => start().catch(() => setConnection("Disconnected", "off")), 5000);
    } else {
      setConnection("Disconnected — reconnecting", "off");
    }
  });
}

function scheduleRefresh() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshDevices().catch(() => {});
    refreshPairing().catch(() => {});
  }, 50);
}

// Thermostats

async function refreshDevices() {
  const answer = await api("api/devices");
  devices = answer.devices;
  const seen = new Set();
  const container = document.getElementById("devices");
  for (const status of devices) {
    seen.add(status.serial);
    let card = cards.get(status.serial);
    if (!card) {
      card = makeCard(status.serial);
      cards.set(status.serial, card);
      container.append(card.root);
      updateCard(card, status);
      card.history.load();
    }
    updateCard(card, status);
  }
  for (const [serial, card] of cards) {
    if (!seen.has(serial)) {
      card.root.remove();
      cards.delete(serial);
    }
  }
  const empty = document.getElementById("empty");
  empty.hidden = devices.length > 0;
  scheduleDevicesChanged(devices);
}

const MODES = [
  ["off", "Off", () => true],
  ["heat", "Heat", (c) => c.can_heat],
  ["cool", "Cool", (c) => c.can_cool],
  ["range", "Heat·Cool", (c) => c.can_heat && c.can_cool],
  ["emergency", "Emergency heat", (c) => c.has_emer_heat],
];

function makeCard(serial) {
  const card = { serial, status: null };
  const title = element("h3", { id: `title-${serial}` });
  card.title = title;
  card.subtitle = element("p", { class: "muted" });
  card.online = element("p", { class: "online" });
  card.current = element("p", { class: "current" });
  card.doing = element("p", { class: "doing" });
  card.target = element("p", { class: "target", "aria-live": "polite" });
  card.error = element("p", { class: "error", role: "alert" });
  card.history = makeHistory(serial, api);

  const step = (which, direction) => () => changeSetpoint(card, which, direction);
  const adjust = (which, label) =>
    element(
      "div",
      { class: "adjust", role: "group", "aria-label": label },
      element("button", { type: "button", "aria-label": `Lower ${label.toLowerCase()}`, onclick: step(which, -1), text: "−" }),
      element("button", { type: "button", "aria-label": `Raise ${label.toLowerCase()}`, onclick: step(which, 1), text: "+" }),
    );
  card.single = adjust("single", "Target");
  card.low = adjust("low", "Heat to");
  card.high = adjust("high", "Cool to");

  card.modeButtons = new Map();
  const modes = element("div", { class: "modes", role: "group", "aria-label": "Mode" });
  for (const [mode, label] of MODES) {
    const button = element("button", {
      type: "button",
      "aria-pressed": "false",
      text: label,
      onclick: () => run(card, () => command(serial, "set_mode", mode === "range" ? "heat-cool" : mode)),
    });
    card.modeButtons.set(mode, button);
    modes.append(button);
  }
  card.eco = element("button", {
    type: "button",
    "aria-pressed": "false",
    text: "Eco (away)",
    onclick: () => run(card, () => command(serial, "set_away", !card.status.away)),
  });
  card.fanMinutes = element("select", { "aria-label": "Fan run time" });
  for (const [minutes, label] of [[15, "15 min"], [30, "30 min"], [60, "1 hour"], [120, "2 hours"], [240, "4 hours"], [720, "12 hours"]]) {
    card.fanMinutes.append(element("option", { value: String(minutes * 60), text: label }));
  }
  card.fanMinutes.value = "3600";
  card.fanState = element("span", { class: "muted" });
  card.fan = element(
    "div",
    { class: "fan", role: "group", "aria-label": "Fan" },
    card.fanMinutes,
    element("button", { type: "button", text: "Run fan", onclick: () => run(card, () => command(serial, "set_fan", Number(card.fanMinutes.value))) }),
    element("button", { type: "button", text: "Fan auto", onclick: () => run(card, () => command(serial, "set_fan", "auto")) }),
    card.fanState,
  );
  card.root = element(
    "article",
    { class: "card", "aria-labelledby": `title-${serial}` },
    title,
    card.subtitle,
    card.online,
    card.current,
    card.doing,
    card.target,
    card.single,
    card.low,
    card.high,
    modes,
    element("div", { class: "row" }, card.eco),
    card.fan,
    card.error,
    card.history.root,
  );
  return card;
}

async function run(card, action) {
  card.error.textContent = "";
  try {
    await action();
  } catch (e) {
    card.error.textContent = e.message;
  }
}

function changeSetpoint(card, which, direction) {
  const status = card.status;
  const scale = status.temperature_scale;
  const moved = (celsius) => {
    const shown = toScale(celsius ?? 20, scale);
    const step = scaleStep(scale);
    return celsiusFrom(Math.round(shown / step) * step + direction * step, scale);
  };
  let value;
  if (which === "single") {
    value = moved(status.target_temperature);
  } else {
    value = { low: status.target_temperature_low ?? 19, high: status.target_temperature_high ?? 24 };
    value[which] = moved(value[which]);
    if (value.low > value.high) {
      card.error.textContent = "Heat-to cannot go above cool-to.";
      return;
    }
  }
  run(card, () => command(status.serial, "set_temperature", value));
}

function doing(status) {
  const hvac = status.hvac || {};
  if (hvac.emer_heat) return "Emergency heating";
  if (hvac.heater || hvac.heat_x2 || hvac.heat_x3 || hvac.aux_heat || hvac.alt_heat) return "Heating";
  if (hvac.ac || hvac.cool_x2 || hvac.cool_x3) return "Cooling";
  if (hvac.fan || status.fan_timer_active) return "Fan running";
  return "Idle";
}

function since(ms) {
  if (ms == null) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(ms).toLocaleString();
}

function updateCard(card, status) {
  card.status = status;
  const scale = status.temperature_scale;
  const t = (celsius) => formatTemperature(celsius, scale);
  card.title.textContent = status.name || status.serial;
  card.subtitle.textContent = `${status.name ? status.serial + " · " : ""}${status.paired ? "account " + status.owner : "not claimed"}`;
  card.online.textContent = status.is_online ? "Online" : `Offline — last seen ${since(status.last_seen_ms)}`;
  card.online.dataset.state = status.is_online ? "live" : "off";
  const humidity = status.humidity == null ? "" : ` · humidity ${status.humidity} %`;
  card.current.textContent = `Now ${t(status.current_temperature)}${humidity}`;
  const eco = status.away || status.eco_mode !== "off";
  card.doing.textContent = `${doing(status)}${eco ? " · Eco" : ""}`;
  const mode = status.mode;
  if (mode === "range") {
    card.target.textContent = `Heat to ${t(status.target_temperature_low)} · cool to ${t(status.target_temperature_high)}`;
  } else if (mode === "off") {
    card.target.textContent = "Off";
  } else {
    card.target.textContent = `Target ${t(status.target_temperature)}`;
  }
  card.single.hidden = !(mode === "heat" || mode === "cool" || mode === "emergency");
  card.low.hidden = card.high.hidden = mode !== "range";
  const capabilities = status.capabilities || {};
  for (const [name, , allowed] of MODES) {
    const button = card.modeButtons.get(name);
    button.hidden = !allowed(capabilities);
    button.setAttribute("aria-pressed", String(mode === name));
  }
  card.eco.setAttribute("aria-pressed", String(eco));
  card.fan.hidden = !capabilities.has_fan;
  card.history.update(status);
  card.fanState.textContent = status.fan_timer_active
    ? `running until ${new Date(status.fan_timer_timeout * 1000).toLocaleTimeString()}`
    : "auto";
}

// Pairing

let entryURL = null;

async function refreshPairing() {
  const answer = await api("api/pairing");
  entryURL = answer.entry_url || "this server's device port";
  document.getElementById("entry-url").textContent = entryURL;
  document.getElementById("empty").textContent =
    `No thermostat has connected yet — point it at ${entryURL}.`;
  const list = document.getElementById("unclaimed");
  list.replaceChildren(
    ...(answer.unclaimed.length
      ? answer.unclaimed.map((serial) => element("li", { text: serial }))
      : [element("li", { class: "muted", text: "None right now." })]),
  );
}

document.getElementById("pair-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = document.getElementById("pair-message");
  message.textContent = "Claiming…";
  try {
    const answer = await api("api/register", {
      method: "POST",
      body: {
        code: document.getElementById("pair-code").value,
        userId: document.getElementById("pair-account").value,
      },
    });
    message.textContent = answer.message;
    document.getElementById("pair-code").value = "";
    scheduleRefresh();
  } catch (e) {
    message.textContent = e.message;
  }
});

// Schedule

const schedule = setupSchedule({ api, command });

function scheduleDevicesChanged(list) {
  schedule.devicesChanged(list);
}

setInterval(() => {
  for (const card of cards.values()) if (card.status) updateCard(card, card.status);
}, 30000);

start().catch((e) => setConnection(`Cannot reach the server: ${e.message}`, "off"));
