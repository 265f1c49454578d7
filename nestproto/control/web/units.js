// Temperatures: the API speaks Celsius; the page shows each thermostat's
// own scale ("C" or "F").

export function toScale(celsius, scale) {
  return scale === "F" ? (celsius * 9) / 5 + 32 : celsius;
}

export function celsiusFrom(value, scale) {
  const celsius = scale === "F" ? ((value - 32) * 5) / 9 : value;
  return Math.round(celsius * 100) / 100;
}

export function scaleStep(scale) {
  return scale === "F" ? 1 : 0.5;
}

export function roundShown(celsius, scale) {
  const shown = toScale(celsius, scale);
  return scale === "F" ? Math.round(shown) : Math.round(shown * 10) / 10;
}

export function formatTemperature(celsius, scale) {
  if (celsius == null || Number.isNaN(Number(celsius))) return "–";
  const shown = roundShown(Number(celsius), scale);
  return `${scale === "F" ? shown.toFixed(0) : shown.toFixed(1)} °${scale === "F" ? "F" : "C"}`;
}
