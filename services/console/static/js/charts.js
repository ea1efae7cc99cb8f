// Line charts over training steps, drawn by uPlot (vendored: static/vendor/uplot/, a global `uPlot`).
//
// A chart's element carries data-points (how many values its first series has) and data-last-step, so a
// test, or anyone reading the page, can see the chart follow a running job without reading pixels.

import { h, replace } from "./dom.js";
import { fmtNum } from "./format.js";

export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const HEIGHT = 190;
// Steps are whole numbers: ticks at these spacings only (uPlot picks the smallest that fits).
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000];

export class StepChart {
  /**
   * @param {string} id  the element id ("chart-loss")
   * @param {string} title
   * @param {{label: string, color?: string, points?: boolean}[]} series  the y series
   * @param {{format?: (v: number) => string, empty?: string}} options
   */
  constructor(id, title, series, { format = (v) => fmtNum(v, 3), empty = "No points yet." } = {}) {
    this.series = series;
    this.format = format;
    this.plot = null;
    this.body = h("div", { class: "chart-body" }, h("p", { class: "muted chart-empty" }, empty));
    this.el = h("figure", { id, class: "chart", dataset: { points: "0", lastStep: "" } },
      h("figcaption", {}, title), this.body);
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.el);
  }

  /** Shows `xs` (steps, ascending) against each series' ys (null where a series has no value). */
  setData(xs, ys) {
    const count = ys[0] ? ys[0].filter((v) => v !== null && v !== undefined).length : 0;
    this.el.dataset.points = String(count);
    this.el.dataset.lastStep = xs.length ? String(xs[xs.length - 1]) : "";
    if (!xs.length) return;
    const data = [xs, ...ys];
    if (this.plot === null) {
      if (typeof uPlot === "undefined") {
        replace(this.body, h("p", { class: "error" }, "The chart library did not load."));
        return;
      }
      replace(this.body);
      this.plot = new uPlot(this.options(), data, this.body);
    } else {
      this.plot.setData(data);
    }
  }

  options() {
    const format = this.format;
    return {
      width: this.width(),
      height: HEIGHT,
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      axes: [
        { label: "step", labelSize: 20, size: 36, stroke: "#475569", grid: { stroke: "#e2e8f0" }, incrs: STEP_INCREMENTS },
        { size: 64, stroke: "#475569", grid: { stroke: "#e2e8f0" }, values: (u, vals) => vals.map((v) => format(v)) },
      ],
      series: [
        { label: "step" },
        ...this.series.map((s, i) => ({
          label: s.label,
          stroke: s.color || COLORS[i % COLORS.length],
          width: 2,
          spanGaps: true,
          points: { show: s.points ?? false, size: 6 },
          value: (u, v) => (v === null || v === undefined ? "—" : format(v)),
        })),
      ],
    };
  }

  width() {
    return Math.max(240, Math.floor(this.el.clientWidth || 480) - 4);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: HEIGHT });
  }
}
