"""PyTorch layers: the classifier heads, the class-mean tracker they share, the losses and the
frozen simplex-ETF linear layers."""

from nearest_etf.nn import class_means, etf_layers, heads, losses
from nearest_etf.nn.class_means import *
from nearest_etf.nn.etf_layers import *
from nearest_etf.nn.heads import *
from nearest_etf.nn.losses import *

__all__ = [*heads.__all__, *class_means.__all__, *losses.__all__, *etf_layers.__all__]
