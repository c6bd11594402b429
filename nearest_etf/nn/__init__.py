"""PyTorch layers: the classifier heads, the class-mean tracker they share, the losses and the
frozen simplex-ETF linear layers."""

from nearest_etf.nn.class_means import (
    AVERAGES,
    ClassMeanTracker,
    TrackerUpdate,
    check_batch,
    class_sums,
    distributed_sum,
)
from nearest_etf.nn.etf_layers import (
    ETF_MODES,
    ETFLinear,
    convert_to_etf,
    etf_weight,
    fix_last_layers,
    linear_layer_names,
    nearest_etf_weight,
    trainable_parameters,
)
from nearest_etf.nn.heads import (
    HEADS,
    FixedETFHead,
    ImplicitETFHead,
    LearnedHead,
    make_head,
)
from nearest_etf.nn.losses import (
    LOSSES,
    dot_regression_loss,
    loss_function,
    mse_one_hot_loss,
)

__all__ = [
    "AVERAGES",
    "ETF_MODES",
    "HEADS",
    "LOSSES",
    "ClassMeanTracker",
    "ETFLinear",
    "FixedETFHead",
    "ImplicitETFHead",
    "LearnedHead",
    "TrackerUpdate",
    "check_batch",
    "class_sums",
    "convert_to_etf",
    "distributed_sum",
    "dot_regression_loss",
    "etf_weight",
    "fix_last_layers",
    "linear_layer_names",
    "loss_function",
    "make_head",
    "mse_one_hot_loss",
    "nearest_etf_weight",
    "trainable_parameters",
]
