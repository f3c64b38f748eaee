// Range selection and a playhead over a song's preview.png. The image's columns are linear in
// time with no margins (shared/core/preview.py), so x / width × duration is the time under x.

const CLICK_PX = 4; // a press that moves less than this is a click: play from there

export class Waveform {
  constructor(container, selection, playhead, audio, onRange) {
    Object.assign(this, { container, selection, playhead, audio, onRange });
    this.duration = 0;
    this.anchor = null;
    container.addEventListener("pointerdown", (event) => this.press(event));
    container.addEventListener("pointermove", (event) => this.drag(event));
    container.addEventListener("pointerup", (event) => this.release(event));
    const tick = () => {
      this.showPlayhead();
      if (!audio.paused) requestAnimationFrame(tick);
    };
    audio.addEventListener("play", tick);
    audio.addEventListener("seeked", () => this.showPlayhead());
    audio.addEventListener("timeupdate", () => this.showPlayhead());
  }

  reset(duration) {
    this.duration = duration;
    this.anchor = null;
    this.selection.hidden = true;
    this.showPlayhead();
  }

  fraction(event) {
    const box = this.container.getBoundingClientRect();
    return Math.min(Math.max((event.clientX - box.left) / box.width, 0), 1);
  }

  press(event) {
    if (!this.duration || event.button !== 0) return;
    this.container.setPointerCapture(event.pointerId);
    this.anchor = this.fraction(event);
    this.startX = event.clientX;
  }

  drag(event) {
    if (this.anchor === null) return;
    this.show(this.anchor, this.fraction(event));
  }

  release(event) {
    if (this.anchor === null) return;
    const [anchor, here] = [this.anchor, this.fraction(event)];
    this.anchor = null;
    if (Math.abs(event.clientX - this.startX) < CLICK_PX) {
      this.audio.currentTime = here * this.duration;
      return;
    }
    const [start, end] = this.show(anchor, here);
    this.onRange(start * this.duration, end * this.duration);
  }

  // Draws the range between two fractions; returns it ordered.
  show(a, b) {
    const [start, end] = a < b ? [a, b] : [b, a];
    this.selection.hidden = false;
    this.selection.style.left = `${start * 100}%`;
    this.selection.style.width = `${(end - start) * 100}%`;
    return [start, end];
  }

  showPlayhead() {
    const at = this.duration ? Math.min(this.audio.currentTime / this.duration, 1) : 0;
    this.playhead.style.left = `${at * 100}%`;
  }
}
