"""Draws docs/pacs_flow.png, the nightly PACS flow of docs/pacs.md: `python docs/pacs_flow.py`."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, text, colour)
    "pacs": (0.7, 2.6, "PACS\n(DICOMweb)", "#dbe8f5"),
    "qido": (3.3, 4.3, "QIDO-RS\nstudies of the dates\n-> series -> instances", "#f5f0db"),
    "rules": (6.0, 4.3, "selection rules\nCR/DX/DR, CHEST, PA/AP", "#f5f0db"),
    "skip": (6.0, 2.6, "skipped rows\nlateral_view, not_chest ...\n(never fetched)", "#eeeeee"),
    "ledger": (8.7, 4.3, "ledger: SOP UID +\nmodel version scored\nbefore? not fetched", "#e6f2e6"),
    "read": (8.7, 2.6, "Ray Data read tasks\nWADO-RS fetch, decode,\nbounds (as for files)", "#e6f2e6"),
    "actors": (8.7, 0.9, "Classifier actors\ncalibrated answer\n+ OOD flag", "#e6f2e6"),
    "report": (11.3, 0.9, "predictions, ledger,\nreport (PACS section)", "#e6f2e6"),
    "sr": (6.0, 0.9, "DICOM SR (TID 1500, AIR)\n+ heat-map SC (optional)\ndeterministic UIDs", "#fbe3d6"),
    "stow": (3.3, 0.9, "STOW-RS into the same\nstudy (--pacs-store);\n--sr-out: files", "#fbe3d6"),
}
ARROWS = [("pacs", "qido"), ("qido", "rules"), ("rules", "skip"), ("rules", "ledger"), ("ledger", "read"),
          ("read", "actors"), ("actors", "report"), ("actors", "sr"), ("sr", "stow"), ("stow", "pacs")]
W, H = 2.2, 1.05


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 5), dpi=110)
    patches = {}
    for name, (x, y, text, colour) in BOXES.items():
        patches[name] = FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.05", fc=colour, ec="#555")
        ax.add_patch(patches[name])
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
    for start, end in ARROWS:  # clipped at the boxes' edges
        ax.add_patch(FancyArrowPatch(BOXES[start][:2], BOXES[end][:2], patchA=patches[start], patchB=patches[end],
                                     arrowstyle="-|>", mutation_scale=14, color="#333"))
    ax.set_xlim(-0.6, 12.6)
    ax.set_ylim(0.1, 5.0)
    ax.axis("off")
    ax.set_title("xray-ray score --pacs URL --study-date D1-D2: one night, PACS in and PACS out", fontsize=11)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("pacs_flow.png"))


if __name__ == "__main__":
    main()
