"""Controlled synthetic task: a Gaussian mixture with a different random teacher per cluster.

The task is built so that a mixture of experts has something to specialise on: the input space splits into
``num_clusters`` well-separated Gaussian blobs, and inside each blob the target is produced by that blob's own
random teacher network. A router that sends each cluster to its own expert can solve the task with small experts;
one shared FFN has to fit all teachers at once.

Shape legend:
    N  samples in a split
    C  clusters (mixture components, one teacher each)
    I  input dim
    O  output dim (regression targets, or the number of classes)
    H  teacher hidden width

Everything is drawn from local ``torch.Generator`` objects seeded from ``seed``, never from the global RNG, so
every call and every process (DDP ranks included) sees the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.data.resumable import ResumableDataLoader, ResumableTrainData

TASKS = ("regression", "classification")
SPLITS = ("train", "val", "test")

# Each split draws from its own generator, so changing ``num_train`` leaves the validation and test data as they
# were. The offsets only need to be distinct; a large prime keeps nearby seeds from sharing a stream.
_SPLIT_SEED_STRIDE = 1_000_003
# Closest allowed pair of cluster means, in units of cluster_spread: 5 standard deviations to the midpoint, so a
# sample lands nearer another cluster's mean with probability below 1e-6.
MIN_MEAN_DISTANCE = 10.0


@dataclass(frozen=True)
class MixtureTeachers:
    """Parameters of the synthetic task: the cluster means and one random teacher per cluster.

    Attributes:
        means_CI: Cluster means, shape ``(C, I)``.
        hidden_weight_CIH: First teacher layer, shape ``(C, I, H)``; ``None`` for linear teachers.
        hidden_bias_CH: First teacher bias, shape ``(C, H)``; ``None`` for linear teachers.
        output_weight_CKO: Last teacher layer, shape ``(C, K, O)`` with ``K = H`` (or ``K = I`` when linear).
        output_bias_CO: Last teacher bias, shape ``(C, O)``.
        cluster_spread: Standard deviation of each cluster around its mean.
    """

    means_CI: torch.Tensor
    hidden_weight_CIH: torch.Tensor | None
    hidden_bias_CH: torch.Tensor | None
    output_weight_CKO: torch.Tensor
    output_bias_CO: torch.Tensor
    cluster_spread: float

    def __call__(self, x_NI: torch.Tensor, cluster_N: torch.Tensor) -> torch.Tensor:
        """Noise-free teacher outputs, each sample through its own cluster's teacher.

        Args:
            x_NI: Inputs, shape ``(N, I)``.
            cluster_N: Cluster index of each sample, shape ``(N,)``, values in ``[0, C)``.

        Returns:
            Teacher outputs, shape ``(N, O)``.
        """
        # Teachers act on cluster-local coordinates, which are ~N(0, I) inside the cluster: the nonlinearity is
        # exercised across the whole blob instead of being nearly constant (or saturated) on it.
        local_NI = (x_NI - self.means_CI[cluster_N]) / self.cluster_spread
        features_NK = local_NI
        if self.hidden_weight_CIH is not None:
            pre_NH = torch.einsum("ni,nih->nh", local_NI, self.hidden_weight_CIH[cluster_N])
            features_NK = torch.tanh(pre_NH + self.hidden_bias_CH[cluster_N])
        return (
            torch.einsum("nk,nko->no", features_NK, self.output_weight_CKO[cluster_N]) + self.output_bias_CO[cluster_N]
        )


def make_teachers(
    num_clusters: int,
    input_dim: int,
    output_dim: int,
    teacher_hidden: int,
    cluster_spread: float,
    generator: torch.Generator,
) -> MixtureTeachers:
    """Draw cluster means and per-cluster teachers.

    Means are standard normal in ``input_dim`` dims: two means are about ``sqrt(2 * input_dim)`` apart (8 for the
    default 32 dims). The set is scaled up when needed so that no two means are closer than ``MIN_MEAN_DISTANCE``
    cluster widths; the clusters then practically never overlap. Teacher weights are scaled by
    ``1 / sqrt(fan_in)`` so that pre-activations and outputs are O(1).

    Args:
        num_clusters: Number of clusters ``C``.
        input_dim: Input dimension ``I``.
        output_dim: Output dimension ``O``.
        teacher_hidden: Hidden width ``H`` of each teacher; 0 makes each teacher a random affine map.
        cluster_spread: Standard deviation of each cluster around its mean.
        generator: Source of randomness.

    Returns:
        The task parameters.
    """
    C, I, O, H = num_clusters, input_dim, output_dim, teacher_hidden
    means_CI = torch.randn(C, I, generator=generator)
    if C > 1:
        # In few dims two random means can land close together; spread the whole set out until every pair is
        # MIN_MEAN_DISTANCE cluster widths apart, so that each sample lies nearest its own mean.
        distances_CC = torch.cdist(means_CI, means_CI) + torch.diag(torch.full((C,), math.inf))
        means_CI = means_CI * max(1.0, MIN_MEAN_DISTANCE * cluster_spread / distances_CC.min().item())
    hidden_weight_CIH = hidden_bias_CH = None
    fan_in = I
    if H > 0:
        hidden_weight_CIH = torch.randn(C, I, H, generator=generator) / math.sqrt(I)
        hidden_bias_CH = 0.5 * torch.randn(C, H, generator=generator)
        fan_in = H
    output_weight_CKO = torch.randn(C, fan_in, O, generator=generator) / math.sqrt(fan_in)
    output_bias_CO = 0.2 * torch.randn(C, O, generator=generator)
    return MixtureTeachers(
        means_CI, hidden_weight_CIH, hidden_bias_CH, output_weight_CKO, output_bias_CO, cluster_spread
    )


def sample_split(
    teachers: MixtureTeachers,
    num_samples: int,
    noise_std: float,
    task: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one split of the task.

    Clusters are equally likely. Regression targets are the teacher output plus Gaussian noise; classification
    targets are the argmax over the noisy teacher output, so ``noise_std`` acts as label noise near class borders.

    Args:
        teachers: Task parameters from :func:`make_teachers`.
        num_samples: Number of samples ``N``.
        noise_std: Standard deviation of the target noise.
        task: ``"regression"`` or ``"classification"``.
        generator: Source of randomness.

    Returns:
        ``(x_NI, y, cluster_N)``: float inputs ``(N, I)``; targets, float ``(N, O)`` for regression or long
        ``(N,)`` for classification; and the long cluster index of each sample ``(N,)``.
    """
    num_clusters, input_dim = teachers.means_CI.shape
    cluster_N = torch.randint(num_clusters, (num_samples,), generator=generator)
    offset_NI = teachers.cluster_spread * torch.randn(num_samples, input_dim, generator=generator)
    x_NI = teachers.means_CI[cluster_N] + offset_NI
    clean_NO = teachers(x_NI, cluster_N)
    noisy_NO = clean_NO + noise_std * torch.randn(clean_NO.shape, generator=generator)
    y = noisy_NO if task == "regression" else noisy_NO.argmax(dim=-1)
    return x_NI, y, cluster_N


def collate_pairs(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(x, y)`` samples into an ``(x, y)`` tuple (``default_collate`` would return a list)."""
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.stack(ys)


class SyntheticMoEDataModule(ResumableTrainData, LightningDataModule):
    """Gaussian-mixture inputs with a different random teacher per cluster; no download needed.

    Batches are ``(x, y)`` tuples: ``x`` float ``(B, input_dim)``; ``y`` float ``(B, output_dim)`` for
    ``task="regression"``, or long ``(B,)`` with values in ``[0, output_dim)`` for ``task="classification"``.
    The data depends only on the arguments: the same ``seed`` gives identical tensors in every process.

    Args:
        num_clusters: Number of Gaussian clusters, each with its own teacher (>= 1).
        input_dim: Input dimension (>= 1).
        output_dim: Regression output dimension, or the number of classes for classification (>= 1; >= 2 for
            classification).
        num_train: Number of training samples (>= 1).
        num_val: Number of validation samples (>= 1).
        num_test: Number of test samples (>= 1).
        noise_std: Standard deviation of the Gaussian noise added to the teacher outputs (>= 0).
        cluster_spread: Standard deviation of each cluster around its mean (> 0). Means are standard normal, scaled
            up if needed so that no two are closer than 10 cluster_spread.
        teacher_hidden: Hidden width of each cluster's tanh teacher MLP; 0 makes each teacher an affine map (>= 0).
        task: ``"regression"`` or ``"classification"``.
        batch_size: Batch size of every dataloader (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: Seed of the task (means and teachers) and of the samples; also seeds the training shuffle.

    Example:
        >>> dm = SyntheticMoEDataModule(num_train=256, num_val=64, num_test=64, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((32, 32), (32, 32))
    """

    def __init__(
        self,
        num_clusters: int = 8,
        input_dim: int = 32,
        output_dim: int = 32,
        num_train: int = 8192,
        num_val: int = 1024,
        num_test: int = 1024,
        noise_std: float = 0.05,
        cluster_spread: float = 0.5,
        teacher_hidden: int = 64,
        task: Literal["regression", "classification"] = "regression",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_clusters", num_clusters),
            ("input_dim", input_dim),
            ("output_dim", output_dim),
            ("num_train", num_train),
            ("num_val", num_val),
            ("num_test", num_test),
            ("batch_size", batch_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
        for name, value in (("teacher_hidden", teacher_hidden), ("num_workers", num_workers)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (>= 0), got {value!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "classification" and output_dim < 2:
            raise ValueError(
                f"output_dim is the number of classes for task='classification' and must be >= 2, got {output_dim}"
            )
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not cluster_spread > 0:
            raise ValueError(f"cluster_spread must be > 0, got {cluster_spread!r}")
        self.save_hyperparameters()
        self.num_clusters = num_clusters
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.task = task
        self.num_samples = {"train": num_train, "val": num_val, "test": num_test}
        self.noise_std = float(noise_std)
        self.cluster_spread = float(cluster_spread)
        self.teacher_hidden = teacher_hidden
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.teachers: MixtureTeachers | None = None
        self.datasets: dict[str, TensorDataset] = {}
        self.clusters: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Generate all three splits (cheap, in memory, identical on every call)."""
        if self.datasets:
            return
        self.teachers = make_teachers(
            self.num_clusters,
            self.input_dim,
            self.output_dim,
            self.teacher_hidden,
            self.cluster_spread,
            torch.Generator().manual_seed(self.seed),
        )
        for index, split in enumerate(SPLITS):
            generator = torch.Generator().manual_seed(self.seed + _SPLIT_SEED_STRIDE * (index + 1))
            x, y, cluster_N = sample_split(self.teachers, self.num_samples[split], self.noise_std, self.task, generator)
            self.datasets[split] = TensorDataset(x, y)
            self.clusters[split] = cluster_N

    def cluster_labels(self, split: str) -> torch.Tensor:
        """Cluster index of every sample of ``split`` (``"train"``, ``"val"`` or ``"test"``), long ``(N,)``.

        Handy for checking whether experts specialise on clusters; aligned with the unshuffled dataset order.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return self.clusters[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        # The shuffled split keeps its place in checkpoints, so a resumed fit draws the batches it would have drawn.
        loader_class = ResumableDataLoader if shuffle else DataLoader
        return loader_class(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order is seeded by ``seed``."""
        return self.resumable_train_loader(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test", shuffle=False)
