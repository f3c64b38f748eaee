// A transcript (transcript.json: segments with start/end/text, words where the model gave
// them) shown time-aligned: the segment (and word) being sung is highlighted while playing.

export class Karaoke {
  constructor(list, audio) {
    this.list = list;
    this.items = [];
    audio.addEventListener("timeupdate", () => this.at(audio.currentTime));
    audio.addEventListener("seeked", () => this.at(audio.currentTime));
  }

  clear() {
    this.list.replaceChildren();
    this.items = [];
  }

  show(transcript) {
    this.clear();
    for (const segment of transcript.segments ?? []) {
      const item = document.createElement("li");
      Object.assign(item.dataset, { start: segment.start, end: segment.end });
      const words = segment.words ?? [];
      if (words.length) {
        for (const word of words) {
          const span = document.createElement("span");
          span.textContent = word.word;
          Object.assign(span.dataset, { start: word.start, end: word.end });
          item.append(span);
        }
      } else {
        item.textContent = segment.text;
      }
      this.list.append(item);
      this.items.push(item);
    }
    if (!this.items.length) {
      const item = document.createElement("li");
      item.textContent = "(no words heard)";
      this.list.append(item);
    }
  }

  at(time) {
    const within = (node) => Number(node.dataset.start) <= time && time < Number(node.dataset.end);
    for (const item of this.items) {
      const current = within(item);
      if (current && !item.classList.contains("current")) {
        item.scrollIntoView({ block: "nearest" });
      }
      item.classList.toggle("current", current);
      for (const span of item.querySelectorAll("span")) {
        span.classList.toggle("current", current && within(span));
      }
    }
  }
}
