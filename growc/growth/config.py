"""Settings of one growth run, shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TRIGGERS = ("epochs", "plateau")


@dataclass
class GrowthConfig:
    steps: int = 100  # at most this many growth steps; a budget or the significance test usually stops first
    # Training epochs between growth steps; a fraction trains that share of an epoch's batches.
    # A quarter epoch: a small network needs little training before its next bottleneck is clear,
    # and longer gaps let it memorize, until the significance test (rightly) stops. MNIST MLP from
    # [1, 1], 100k budget, seeds 0-2: 98.10 / 98.11 / 98.26% in about 25 epochs in all, against
    # 98.11 / 98.08 / 97.95% in about 40 with one epoch; digits: 97.2% against 96.1% (docs/method.md).
    epochs: float = 0.25
    final_epochs: int | None = 20  # training after the last growth step (None: `epochs`)
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 3e-3
    # L2 penalty on every weight (Adam's coupled form). A grown network spends its growth epochs at
    # a constant learning rate and then fits its training set to a loss near 0 in the final phase;
    # 1e-4 keeps it from memorizing: MNIST MLP at 100k parameters, seeds 0-2, 97.68% median
    # without it, 98.01% with it (3e-4: 97.74 / 97.99 on seeds 0 / 1). docs/method.md.
    weight_decay: float = 1e-4
    max_params: int | None = None  # never grow past this many parameters
    max_flops: int | None = None  # stop growing once a sample costs this many multiply-adds
    target_accuracy: float | None = None  # stop growing once validation accuracy reaches this
    time_budget: float | None = None  # seconds; stop growing once the run has used them
    # What triggers a growth step: "epochs" (after `epochs` epochs) or "plateau" (once the
    # validation loss improves by less than `plateau_tolerance` (relative) over an epoch, after
    # at most `epochs` epochs).
    trigger: str = "epochs"
    plateau_tolerance: float = 0.01
    strategy: str = "tiny"  # how new neurons are chosen: "tiny", "random", "gradmax"
    stat_samples: int = 16384  # training samples of the measurement pass whose moments drive a growth step
    folds: int = 4  # folds of those samples for the significance test
    stat_rows_per_sample: int = 16  # conv sites: at most this many positions per sample (random)
    ridge: float = 0.1  # shrinkage of the producer-input covariance before whitening (0: exact)
    significance_z: float = 2.0  # held-out gain must exceed z standard errors
    patience: int = 3  # stop after this many steps in a row with no significant gain anywhere
    # Stop once the validation loss has not improved on its best by `plateau_tolerance` (relative)
    # over this many epochs of growth (None: never). At a constant learning rate the training loss
    # stays at the optimizer's noise floor, where the gradient still holds directions that
    # generalize: on MNIST the significance test kept passing past a million parameters while
    # validation accuracy had flattened. Growth that no longer shows on held-out data stops.
    validation_patience: float | None = 3.0
    line_search_samples: int = 512  # training samples the amplitude search evaluates on
    max_new_per_site: int | None = None  # per step; default: the site's current width, at least 4
    update_existing: bool = True  # also apply the best update of the consumers' weights
    # Also consider new residual blocks on the edges into layers. A block's output joins its edge's
    # units as one more writer of a residual stream (coupled growth), so the layer that writes the
    # edge still widens. Off by default: in the one benchmark that tries it (CIFAR-10 ResNet,
    # README) the run with depth growth stayed below the full-width model trained as long, while
    # width growth alone matched it.
    depth: bool = False
    seed: int = 0
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Settings named by a string, checked before any work so that a typo is one sentence."""
        import torch  # here, not above: the CLI reads the defaults without importing torch

        from growc.errors import GrowcError
        from growc.growth.train import OPTIMIZERS
        from growc.tiny.strategies import STRATEGIES

        for setting, value, choices in (
            ("trigger", self.trigger, TRIGGERS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("strategy", self.strategy, tuple(STRATEGIES)),
        ):
            if value not in choices:
                raise GrowcError(f"unknown {setting} '{value}': choose one of {', '.join(choices)}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise GrowcError(f"unknown device '{self.device}': use cpu, cuda or cuda:N") from None

    def new_neuron_cap(self, width: int) -> int:
        if self.max_new_per_site is not None:
            return self.max_new_per_site
        return max(4, width)
