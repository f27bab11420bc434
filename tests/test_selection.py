"""Checkpoint choice and the overfitting alarm on hand-made metric curves."""

from style_dreambooth.evaluation.selection import Point, choose_checkpoint, overfitting_alarm


def curve(rows):
    return [Point(step, f"step-{step:06d}" if step else "base", m) for step, m in rows]


def test_earliest_saturated_checkpoint_is_chosen_and_alarm_fires_on_lost_diversity():
    points = curve([
        (0, {"style_distance": 5.0, "diversity": 0.60}),
        (200, {"style_distance": 3.0, "diversity": 0.58, "copy_rate": 0.0}),
        (400, {"style_distance": 1.3, "diversity": 0.55, "copy_rate": 0.0}),
        (800, {"style_distance": 1.1, "diversity": 0.50, "copy_rate": 0.0}),
        (1600, {"style_distance": 1.0, "diversity": 0.30, "copy_rate": 0.0}),
    ])
    # largest gain: 5.0 - 1.0 = 4.0; limit 1.0 + 0.4 = 1.4 -> 400, 800, 1600 saturated
    choice = choose_checkpoint(points)
    assert choice.step == 400 and "1.400" in choice.reason
    alarm = overfitting_alarm(points, choice)
    assert alarm.fired and alarm.step == 1600 and "diversity" in alarm.reasons[0]


def test_copies_are_skipped_and_raise_the_alarm():
    points = curve([
        (0, {"style_distance": 4.0}),
        (100, {"style_distance": 1.0, "copy_rate": 0.25}),
        (200, {"style_distance": 1.05, "copy_rate": 0.0, "prompt_fidelity": 0.30}),
        (300, {"style_distance": 1.02, "copy_rate": 0.5, "prompt_fidelity": 0.31}),
    ])
    choice = choose_checkpoint(points)
    assert choice.step == 200 and "skipped" in choice.reason
    alarm = overfitting_alarm(points, choice)
    assert alarm.fired and alarm.step == 300 and any("copy rate" in r for r in alarm.reasons)


def test_no_alarm_on_a_healthy_run_and_fidelity_drop_detected():
    healthy = curve([
        (0, {"style_distance": 3.0, "diversity": 0.5, "prompt_fidelity": 0.3}),
        (100, {"style_distance": 1.2, "diversity": 0.5, "prompt_fidelity": 0.3}),
        (200, {"style_distance": 1.1, "diversity": 0.48, "prompt_fidelity": 0.295}),
    ])
    choice = choose_checkpoint(healthy)
    assert choice.step == 100 and not overfitting_alarm(healthy, choice).fired
    healthy[2].metrics["prompt_fidelity"] = 0.25
    alarm = overfitting_alarm(healthy, choice)
    assert alarm.fired and "prompt fidelity" in alarm.reasons[0]


def test_warns_when_no_checkpoint_beats_the_base():
    points = curve([(0, {"style_distance": 2.0}), (100, {"style_distance": 2.1}), (200, {"style_distance": 2.3})])
    assert "no checkpoint is closer" in choose_checkpoint(points).reason
    points[2].metrics["style_distance"] = 1.5
    assert "no checkpoint is closer" not in choose_checkpoint(points).reason


def test_alarm_fires_when_style_overshoots_and_diversity_collapses():
    # Measured in the proof world with lr x4: the style peaks early, then drifts while every
    # prompt collapses to the same picture.
    points = curve([
        (0, {"style_distance": 5.23, "diversity": 0.73, "prompt_fidelity": 0.38}),
        (250, {"style_distance": 3.43, "diversity": 0.59, "prompt_fidelity": 0.0, "copy_rate": 0.0}),
        (500, {"style_distance": 3.73, "diversity": 0.34, "prompt_fidelity": 0.0, "copy_rate": 0.0}),
    ])
    choice = choose_checkpoint(points)
    assert choice.step == 250
    alarm = overfitting_alarm(points, choice)
    assert alarm.fired and alarm.step == 500 and "diversity fell from 0.590 to 0.340" in alarm.reasons[0]
