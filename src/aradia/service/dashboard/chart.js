// Events per second per event name (execve, fork, …) over the last 5 minutes, from the events this
// page received; a legend with each name's exact count over that window (#chart-totals).

import { h } from "./dom.js";

const WINDOW = 300;

export class RateChart {
  constructor(root) {
    this.counts = new Map(); // name -> Map(second -> count)
    this.totals = h("div", { id: "chart-totals" });
    this.box = h("div", { id: "chart" });
    this.names = [];
    this.plot = null;
    root.append(h("h3", {}, "events/s by name (last 5 minutes, this page's events)"), this.box, this.totals);
  }

  // Count one event record.
  add(record) {
    if (!this.counts.has(record.name)) this.counts.set(record.name, new Map());
    const per = this.counts.get(record.name);
    const s = Math.floor(record.time);
    per.set(s, (per.get(s) || 0) + 1);
  }

  // Redraw the chart and the totals for the window ending now.
  draw() {
    const end = Math.floor(Date.now() / 1000);
    const start = end - WINDOW + 1;
    const xs = Array.from({ length: WINDOW }, (_, i) => start + i);
    const names = [...this.counts.keys()].sort();
    const series = names.map((n) => {
      const per = this.counts.get(n);
      for (const s of per.keys()) if (s < start - 60) per.delete(s);
      return xs.map((x) => per.get(x) || 0);
    });
    this.totals.replaceChildren(...names.map((n, i) => {
      const total = series[i].reduce((a, b) => a + b, 0);
      return h("span", { class: "total", dataset: { name: n, total } }, `${n}: ${total}`);
    }));
    if (typeof window.uPlot !== "function") return; // the banner says why
    if (!this.plot || names.join() !== this.names.join()) {
      if (this.plot) this.plot.destroy();
      this.names = names;
      const palette = ["#4060c0", "#c04060", "#40a060", "#c08020", "#8040c0", "#20a0a0"];
      this.plot = new window.uPlot({
        width: Math.max(400, this.box.clientWidth || 800), height: 180,
        series: [{}, ...names.map((n, i) => ({ label: n, stroke: palette[i % palette.length], width: 1.5 }))],
        axes: [{}, { label: "events/s" }],
      }, [xs, ...series], this.box);
    } else {
      this.plot.setData([xs, ...series]);
    }
  }

  destroy() { if (this.plot) this.plot.destroy(); }
}
