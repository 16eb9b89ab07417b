"""ClipRTN: round to nearest, each group's range shrunk to the least squared rounding error."""

import attrs
import torch

from llmc.api import QuantizationModifier, calculate_qparams, hookimpl, rounding_error, weight_range


@attrs.define(kw_only=True)
class ClipRTNModifier(QuantizationModifier):
    steps: int = 20  # candidate ranges: 100 %, 97.5 %, ... 52.5 % of each group's own

    def weight_qparams(self, weight, args, global_scale):
        lo, hi = weight_range(weight, args)
        best = None
        for step in range(self.steps):
            keep = 1.0 - step / (2 * self.steps)
            scale, zero = calculate_qparams(lo * keep, hi * keep, args, global_scale=global_scale)
            error = rounding_error(weight, scale, zero, args, global_scale)
            if best is None:
                best = error, scale, zero
            else:
                better = error < best[0]
                best = tuple(torch.where(better, new, old) for new, old in zip((error, scale, zero), best, strict=True))
        return best[1], best[2]


@hookimpl
def llmc_register_modifiers(register):
    register(ClipRTNModifier)
