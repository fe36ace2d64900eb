"""`mergesmith inspect --report` on the shipped skill experts, checked in a real headless browser.

Merges the four experts with TIES (density 0.2, lambda 1.5: the setting of docs/skills.md), writes the
HTML report of that config with --merged (what survived of each expert), opens it in Chromium (the Debian package) with console logging on, and checks that the
page logs no console message (errors included), fetches nothing (every image is an embedded PNG that
decodes to a real size) and shows its figures. Saves a screenshot of the top of the page.

    python bench/inspect_report.py [--out /tmp/inspect-report] [--screenshot docs/img/inspect.png]

Exits 1 on any failed check.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "examples" / "skills" / "models"
CONFIG = """merge_method: ties
base_model: {m}/base
models:
  - model: {m}/count
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {m}/rev
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {m}/shift
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {m}/sort
    parameters: {{weight: 1.0, density: 0.2}}
parameters: {{lambda: 1.5}}
"""
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--disable-gpu",
    "--no-sandbox",
    "--enable-logging=stderr",
    "--v=0",
    "--hide-scrollbars",
]


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG from its IHDR chunk, or None if it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/inspect-report"))
    ap.add_argument("--screenshot", type=Path, default=None, help="where to save a PNG of the page's top")
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=1400)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = args.out / "ties.yml"
    cfg.write_text(CONFIG.format(m=SKILLS.relative_to(ROOT)))  # short names in the page; run from ROOT
    page, data = args.out / "report.html", args.out / "report.json"
    merged = args.out / "merged"
    cli = [sys.executable, "-m", "mergesmith"]
    subprocess.run([*cli, "merge", str(cfg), str(merged), "-q", "--overwrite"], check=True, cwd=ROOT)
    cmd = [*cli, "inspect", str(cfg), "--merged", str(merged), "-q", "--overwrite"]
    subprocess.run([*cmd, "--report", str(page), "--json", str(data)], check=True, cwd=ROOT)
    failures = []

    html = page.read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", html)
    if len(sources) < 5:
        failures.append(f"{len(sources)} images in the page, expected at least 5")
    for i, src in enumerate(sources):
        if not src.startswith("data:image/png;base64,"):
            failures.append(f"image {i} is not an embedded PNG: {src[:60]}")
            continue
        size = png_size(base64.b64decode(src.split(",", 1)[1]))
        if size is None or min(size) < 50:
            failures.append(f"image {i} does not decode to a PNG of real size ({size})")
    if re.search(r"(src|href)=['\"]?(https?:)?//", html):
        failures.append("the page references something over the network")

    if not Path(CHROMIUM).exists():
        failures.append(f"{CHROMIUM} not found (apt-get install chromium)")
    else:
        shot = args.out / "screenshot.png"
        run = subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--window-size={args.width},{args.height}",
                f"--screenshot={shot}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
        failures += [f"console: {line}" for line in console]
        dom_images = run.stdout.count("<img ")
        if dom_images != len(sources):
            failures.append(f"the browser's DOM holds {dom_images} images, the file {len(sources)}")
        if "<h2>Figures</h2>" not in run.stdout:
            failures.append("the browser's DOM has no Figures section")
        if not shot.exists() or png_size(shot.read_bytes()) is None:
            failures.append("no screenshot was written")
        elif args.screenshot is not None:
            shutil.copyfile(shot, args.screenshot)
        print(f"chromium: {dom_images} images in the DOM, {len(console)} console messages, screenshot {shot}")
    print(f"report: {page} ({len(html) / 1024:.0f} KiB, {len(sources)} figures); JSON: {data}")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
