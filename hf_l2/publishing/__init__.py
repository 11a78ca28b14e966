"""The model card and the Hub push: what a run publishes about how it was trained, in the order that loses nothing."""

from hf_l2.publishing.hub import HubPublishError
from hf_l2.publishing.mixin import L2PublishingMixin

__all__ = ["HubPublishError", "L2PublishingMixin"]
