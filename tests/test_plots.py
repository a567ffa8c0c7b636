"""growth.png: labelled axes, tick labels that do not run into each other, the final training marked."""

import math

import pytest

from growc.growth.plots import FINAL_TRAINING, growth_figure, write_plots
from growc.growth.report import FINISHED, RUNNING, GrowthReport, SiteGrowthRecord, StepRecord

pytest.importorskip("matplotlib")


def _report(first_params: int, last_params: int, steps: int = 8, status: str = FINISHED) -> GrowthReport:
    """A run whose parameters grow geometrically from `first_params` to `last_params`, its last
    record the final training (no growth after it)."""
    records = []
    for i in range(steps + 1):
        params = round(first_params * (last_params / first_params) ** (min(i, steps - 1) / (steps - 1)))
        loss = 2.3 * math.exp(-0.4 * i)
        grown = [SiteGrowthRecord("fc1", 3 if i < steps else 0, 0.1, 0.1, 1.0, 0.0, 3)]
        records.append(StepRecord(i, params, loss, 1.1 * loss, min(0.99, 0.1 + 0.1 * i), {"fc1": 2 + i}, {}, grown))
    final = {"final_params": last_params} if status == FINISHED else {}
    return GrowthReport({"final_epochs": 5, "epochs": 1}, records, final, "reached the steps", status)


def _overlaps(figure) -> list[tuple[str, str]]:
    """Pairs of neighbouring tick labels (on either axis of either panel) whose boxes intersect."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    found = []
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)]
            low, high = sorted(axis.get_view_interval())
            boxes = []
            for t in labels:
                x, y = t.get_position()
                where = x if axis is ax.xaxis else y
                if t.get_visible() and t.get_text() and low <= where <= high:
                    boxes.append((t.get_text(), t.get_window_extent(renderer)))
            for i, (a, box_a) in enumerate(boxes):
                for b, box_b in boxes[i + 1 :]:
                    if box_a.overlaps(box_b):
                        found.append((a, b))
    return found


@pytest.mark.parametrize("first,last", [(166, 2253), (150, 400), (100, 2_000_000)])
def test_tick_labels_do_not_overlap(first, last):
    assert _overlaps(growth_figure(_report(first, last))) == []


def test_every_panel_has_a_y_label_and_the_final_training_is_marked(tmp_path):
    figure = growth_figure(_report(166, 2253))
    left, right = figure.axes
    assert left.get_ylabel() == "validation accuracy (%)"
    assert right.get_ylabel() == "loss"
    span = [p for p in right.patches if p.get_gid() == FINAL_TRAINING]
    assert len(span) == 1 and "final training (5 epochs)" in [t.get_text() for t in right.get_legend().get_texts()]
    x_start, x_end = span[0].get_x(), span[0].get_x() + span[0].get_width()
    assert (x_start, x_end) == (7, 8)  # from the last growth (after step 7) to the final point
    assert [line.get_gid() for line in left.lines].count(FINAL_TRAINING) == 1
    assert write_plots(_report(166, 2253), tmp_path) == [tmp_path / "growth.png"]
    assert (tmp_path / "growth.png").stat().st_size > 10_000


def test_an_unfinished_run_marks_no_final_training():
    figure = growth_figure(_report(166, 2253, status=RUNNING))
    assert not [a for ax in figure.axes for a in ax.get_children() if a.get_gid() == FINAL_TRAINING]
