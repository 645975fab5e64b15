"""Pure DAOP decisions: calibrated placement, prefill swaps, CPU/GPU split, prediction, degradation.

Everything here is a function of counts, placement tables and a cost model (numpy); only the
prediction and degradation rules take tensors, and none of them touch streams or copies.
"""
from daop.predict.degrade import degrade
from daop.predict.next_layer import prediction_accuracy
from daop.predict.placement import quota_placement
from daop.predict.split import SplitPlan, makespan_split, sum_of_costs_split
from daop.predict.swaps import apply_swaps, plan_swaps

__all__ = [
    "SplitPlan", "apply_swaps", "degrade", "makespan_split", "plan_swaps", "prediction_accuracy",
    "quota_placement", "sum_of_costs_split",
]
