"""The perfusion report as an RGB image: AHA bull's-eye with values plus the segment table.

Layout after Xue et al., Radiology: AI 2020, Figure 3: a bull's-eye of the 16 AHA segments
(basal outer ring, mid, apical inner ring; anterior up, septum on the left as in Cerqueira et al.
2002) coloured by MBF with the value written in each segment, and a table of segment, territory,
mean / median MBF and flags, with global MBF. When the report carries a perfusion reserve, a
second bull's-eye shows MPR per segment and the table gains stress, rest and MPR columns.
Optionally a row of MBF maps with the AHA sector contours in territory colours sits on top
(as in the paper's Figure 3 screenshot).

Rendering uses matplotlib's Agg canvas only (no display needed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (no screen on the server)
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle, Wedge

from perfline.toolbox.aha_report import PerfusionReport
from perfline.toolbox.sector_contours import Contour

logger = logging.getLogger(__name__)

# (inner radius, outer radius, first segment, number of sectors, centre angle of the first
# sector in degrees counter-clockwise from 3 o'clock) - anterior segments point up
_RINGS: tuple[tuple[float, float, int, int, float], ...] = (
    (0.70, 1.00, 1, 6, 90.0),
    (0.40, 0.70, 7, 6, 90.0),
    (0.10, 0.40, 13, 4, 90.0),
)
TERRITORY_COLOURS: dict[str, str] = {"LAD": "#e6c700", "RCA": "#2ca02c", "LCx": "#d62728"}


def segment_wedge_angles(segment: int) -> tuple[float, float, float, float]:
    """(inner radius, outer radius, start angle, end angle) of a segment in the bull's-eye.

    Angles in degrees, counter-clockwise from 3 o'clock; segments advance counter-clockwise from
    the anterior segment (up) through the septum (left), as in the conventions' angle order.
    """
    for inner, outer, first, count, centre in _RINGS:
        if first <= segment < first + count:
            width = 360.0 / count
            start = centre - width / 2 + (segment - first) * width
            return inner, outer, start, start + width
    raise ValueError(f"AHA segment must be 1-16, got {segment}")


def draw_bullseye(ax: Axes, values: dict[int, float | None], *, title: str, cmap: str = "jet",
                  vmin: float = 0.0, vmax: float = 4.0, unit: str = "ml/min/g", decimals: int = 2) -> None:
    """Draw a 16-segment bull's-eye on ``ax``; segments with None values are hatched grey."""
    colour_map = matplotlib.colormaps[cmap]
    norm = Normalize(vmin=vmin, vmax=vmax)
    for segment in range(1, 17):
        inner, outer, start, end = segment_wedge_angles(segment)
        value = values.get(segment)
        if value is None or not np.isfinite(value):
            face, hatch, text = "#bbbbbb", "///", "n/a"
        else:
            face, hatch, text = colour_map(norm(value)), None, f"{value:.{decimals}f}"
        ax.add_patch(Wedge((0, 0), outer, start, end, width=outer - inner, facecolor=face,
                           edgecolor="white", linewidth=1.5, hatch=hatch))
        mid_angle = np.radians((start + end) / 2)
        radius = (inner + outer) / 2
        ax.text(radius * np.cos(mid_angle), radius * np.sin(mid_angle) + 0.045, str(segment), ha="center",
                va="center", fontsize=6, color="black")
        ax.text(radius * np.cos(mid_angle), radius * np.sin(mid_angle) - 0.04, text, ha="center",
                va="center", fontsize=7.5, fontweight="bold", color="black")
    ax.set_xlim(-1.08, 1.08)
    ax.set_ylim(-1.08, 1.08)
    ax.set_aspect("equal")
    ax.axis("off")
    # y given: no automatic title placement (its bounding-box search was a fifth of the render; same image)
    ax.set_title(title, fontsize=10, y=1.0)
    scalar = matplotlib.cm.ScalarMappable(norm=norm, cmap=colour_map)
    bar = ax.figure.colorbar(scalar, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(unit, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _fmt(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _table_rows(report: PerfusionReport) -> tuple[list[str], list[list[str]], list[str]]:
    reserve = {s.segment: s for s in report.reserve.segments} if report.reserve else {}
    if reserve:
        header = ["seg", "name", "terr.", "stress", "rest", "MPR", "flags"]
    else:
        header = ["seg", "name", "terr.", "mean", "median", "flags"]
    rows, colours = [], []
    for seg in report.segments:
        flags = "; ".join(seg.flags)
        flags = flags if len(flags) <= 28 else flags[:27] + "..."
        if reserve:
            r = reserve[seg.segment]
            rows.append([str(seg.segment), seg.name, seg.territory, _fmt(r.stress_mbf_ml_min_g),
                         _fmt(r.rest_mbf_ml_min_g), _fmt(r.mpr), flags])
        else:
            rows.append([str(seg.segment), seg.name, seg.territory, _fmt(seg.mbf_mean_ml_min_g),
                         _fmt(seg.mbf_median_ml_min_g), flags])
        colours.append(TERRITORY_COLOURS[seg.territory])
    g = report.global_values
    if reserve:
        r = report.reserve
        rows.append(["all", "global", "", _fmt(r.stress_global_mbf_ml_min_g), _fmt(r.rest_global_mbf_ml_min_g),
                     _fmt(r.global_mpr), ""])
    else:
        # the median column holds the headline global MBF (pixel-weighted mean of the segment medians)
        rows.append(["all", "global", "", _fmt(g.mbf_mean_ml_min_g), _fmt(g.mbf_ml_min_g), ""])
    colours.append("white")
    return header, rows, colours


@dataclass(frozen=True)
class SliceMapView:
    """One MBF map panel of the report image (paper Figure 3: maps with sector contours).

    Attributes:
        title: panel title, e.g. "slice 0 (basal)".
        mbf_ml_min_g: float [rows, cols] map (NaN = no fit).
        contours: polylines in pixel coordinates (x = column, y = row), drawn in their colours.
    """

    title: str
    mbf_ml_min_g: np.ndarray
    contours: Sequence[Contour] = ()


def _draw_map(ax: Axes, view: SliceMapView, vmax: float, margin_px: int = 12) -> None:
    image = np.asarray(view.mbf_ml_min_g, dtype=np.float64)
    row0, col0, row1, col1 = 0, 0, image.shape[0], image.shape[1]
    if view.contours:
        points = np.concatenate([np.asarray(c.points_xy, dtype=np.float64) for c in view.contours])
        col0 = int(max(0, np.floor(points[:, 0].min()) - margin_px))
        col1 = int(min(image.shape[1], np.ceil(points[:, 0].max()) + margin_px + 1))
        row0 = int(max(0, np.floor(points[:, 1].min()) - margin_px))
        row1 = int(min(image.shape[0], np.ceil(points[:, 1].max()) + margin_px + 1))
    colour_map = matplotlib.colormaps["jet"].with_extremes(bad="black")
    ax.imshow(np.ma.masked_invalid(image[row0:row1, col0:col1]), cmap=colour_map, vmin=0.0, vmax=vmax,
              interpolation="nearest")
    for contour in view.contours:
        points = np.asarray(contour.points_xy, dtype=np.float64)
        closed = np.concatenate([points, points[:1]]) if contour.closed else points
        ax.plot(closed[:, 0] - col0, closed[:, 1] - row0, color=contour.rgb, linewidth=contour.thickness)
    ax.set_xlim(-0.5, col1 - col0 - 0.5)
    ax.set_ylim(row1 - row0 - 0.5, -0.5)
    ax.set_title(view.title, fontsize=9, y=1.0)
    ax.axis("off")


_TABLE_FONT_PT = 9.0
_ROW_HEIGHT_PT = 19.5
_TERRITORY_COLUMN = 2  # "terr." in both layouts of _table_rows


def _draw_table(ax: Axes, header: list[str], rows: list[list[str]], colours: list[str]) -> None:
    """The segment table on ``ax`` (axes off, its top edge) in a monospace font: one text per row (the
    flags as their own red text), the territory cells filled with their colours, the cell lines as one
    line collection. A matplotlib ``Table`` of the same cells spent half of the report's render time
    laying out and drawing its 126 cell texts (docs/integration.md "Session 29")."""
    figure = ax.figure
    width_px = ax.get_position().width * figure.get_figwidth() * figure.dpi
    height_px = ax.get_position().height * figure.get_figheight() * figure.dpi
    columns = len(header)
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) + 2 for c in range(columns)]
    font = {"family": "monospace", "size": _TABLE_FONT_PT, "va": "center", "transform": ax.transAxes}
    # one character of the monospace font, measured once (axes fraction)
    sample_px = figure.canvas.get_renderer().get_text_width_height_descent(
        "0" * 40, FontProperties(family="monospace", size=_TABLE_FONT_PT), False)[0]
    char = sample_px / 40.0 / width_px
    row_height = _ROW_HEIGHT_PT * figure.dpi / 72.0 / height_px
    edges = np.concatenate([[0.0], np.cumsum(widths)]) * char
    edges = edges + max(0.0, 0.5 - edges[-1] / 2)
    top = 1.0
    lines_y = top - row_height * np.arange(len(rows) + 2)  # row r (0: the header) spans lines_y[r + 1] .. [r]

    def line(cells: list[str], upto: int) -> str:
        return "".join(" " + cells[c].ljust(widths[c] - 1) for c in range(upto))

    ax.text(edges[0], top - row_height / 2, line(header, columns), weight="bold", **font)
    for index, (cells, colour) in enumerate(zip(rows, colours), start=1):
        centre = lines_y[index] - row_height / 2
        if colour != "white":
            left, right = edges[_TERRITORY_COLUMN], edges[_TERRITORY_COLUMN + 1]
            ax.add_patch(Rectangle((left, lines_y[index + 1]), right - left, row_height,
                                   facecolor=colour, edgecolor="none", transform=ax.transAxes))
        flagged = bool(cells[-1])
        ax.text(edges[0], centre, line(cells, columns - 1 if flagged else columns), **font)
        if flagged:
            ax.text(edges[columns - 1], centre, " " + cells[-1], color="#b00000", **font)
    horizontal = [[(edges[0], y), (edges[-1], y)] for y in lines_y]
    vertical = [[(x, top), (x, lines_y[-1])] for x in edges]
    ax.add_collection(LineCollection(horizontal + vertical, colors="black", linewidths=0.8, transform=ax.transAxes))


def render_report(report: PerfusionReport, *, slice_maps: Sequence[SliceMapView] = (), dpi: int = 100,
                  vmax_mbf: float | None = None) -> np.ndarray:
    """Render the report to an RGB image.

    Args:
        report: the AHA report (with ``reserve`` filled when stress and rest exist).
        slice_maps: MBF map panels with sector contours, shown in a row above the bull's-eye.
        dpi: resolution; the figure is 12 inches wide and 7 inches high, plus 3.2 inches with
            map panels (1200 x 700 or 1200 x 1020 pixels at 100 dpi).
        vmax_mbf: top of the MBF colour scale; default 4 ml/min/g for stress/unknown, 2 for rest.

    Returns:
        uint8 [rows, cols, 3].
    """
    maps_height = 3.2 if slice_maps else 0.0
    height = 7.0 + maps_height
    figure = Figure(figsize=(12, height), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    has_reserve = report.reserve is not None
    vmax = vmax_mbf if vmax_mbf is not None else (2.0 if report.study.scan == "rest" else 4.0)
    if slice_maps:
        maps_grid = figure.add_gridspec(1, len(slice_maps), left=0.02, right=0.98, top=1 - 1.0 / height,
                                        bottom=1 - (0.9 + maps_height) / height, wspace=0.05)
        for index, view in enumerate(slice_maps):
            _draw_map(figure.add_subplot(maps_grid[0, index]), view, vmax)
    grid = figure.add_gridspec(2 if has_reserve else 1, 2, width_ratios=[1.0, 1.45], left=0.02, right=0.98,
                               top=1 - (1.0 + maps_height + (0.45 if slice_maps else 0.0)) / height,
                               bottom=0.35 / height, wspace=0.08, hspace=0.3)
    # the median: robust to single pixel fits on the top of the flow grid (docs/integration.md)
    mbf = {s.segment: s.mbf_median_ml_min_g for s in report.segments}
    draw_bullseye(figure.add_subplot(grid[0, 0]), mbf, title=f"{report.study.scan} MBF (median, ml/min/g)",
                  vmax=vmax)
    if has_reserve:
        mpr = {s.segment: s.mpr for s in report.reserve.segments}
        draw_bullseye(figure.add_subplot(grid[1, 0]), mpr, title="perfusion reserve (stress / rest)",
                      cmap="viridis", vmin=0.0, vmax=5.0, unit="MPR")
    table_ax = figure.add_subplot(grid[:, 1])
    table_ax.axis("off")
    header, rows, colours = _table_rows(report)
    _draw_table(table_ax, header, rows, colours)
    g = report.global_values
    summary = (f"global MBF {_fmt(g.mbf_ml_min_g)} ml/min/g (pixel-weighted mean of the segment medians; "
               f"all {g.n_pixels} pixels: mean {_fmt(g.mbf_mean_ml_min_g)}, median {_fmt(g.mbf_median_ml_min_g)})")
    if report.reserve is not None:
        summary += f"   global MPR {_fmt(report.reserve.global_mpr)}"
    territory_text = "   ".join(f"{t.territory} {_fmt(t.mbf_median_ml_min_g)}" for t in report.territories)
    figure.text(0.02, 1 - 0.32 / height, f"Perfusion report - patient {report.study.patient_id or '-'}, "
                f"study {report.study.study_id or '-'}, {report.study.scan}, model {report.flow_model or '-'}",
                fontsize=11, fontweight="bold")
    figure.text(0.02, 1 - 0.55 / height, f"{summary}   territories: {territory_text}", fontsize=9)
    if report.flags:
        figure.text(0.42, 0.1 / height, "flags: " + "; ".join(report.flags)[:160], fontsize=8, color="#b00000")
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    logger.debug("rendered report image %s", image.shape)
    return image


def save_png(image: np.ndarray, path) -> None:
    """Write an RGB uint8 [rows, cols, 3] image as PNG."""
    import matplotlib.image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [rows, cols, 3], got {image.dtype} {image.shape}")
    matplotlib.image.imsave(str(path), image)
