"""Observers that tests hand to a growth run."""

from growc.growth.observer import Observer


class StopAfter(Observer):
    """Interrupts the run (as Ctrl-C would) once growth step `step` has completed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def step_end(self, record) -> None:
        if record.step == self.step:
            raise KeyboardInterrupt
