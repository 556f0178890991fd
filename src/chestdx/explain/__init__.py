"""Explanations: native attention maps and the CAM family, post-processing, localization scores
and trust checks, for every chestdx model (see `core` for what a model must provide)."""

from chestdx.explain.core import CAM_METHODS, METHODS, Explanation, explain, method_name, resolve_targets
from chestdx.explain.localization import box_iou, energy_share, localize, mask_iou, pointing_hit
from chestdx.explain.lungs import ct_lung_mask
from chestdx.explain.postprocess import (bounding_box, largest_component, normalise, otsu_threshold, sqrt_product,
                                         threshold_mask)
from chestdx.explain.trust import deletion_insertion, map_ssim, randomized_copy

__all__ = ["CAM_METHODS", "METHODS", "Explanation", "bounding_box", "box_iou", "ct_lung_mask", "deletion_insertion",
           "energy_share", "explain", "largest_component", "localize", "map_ssim", "mask_iou", "method_name",
           "normalise", "otsu_threshold", "pointing_hit", "randomized_copy", "resolve_targets", "sqrt_product",
           "threshold_mask"]
