"""Hessian-guided mixed precision: the most accurate model for a given size.

  sensitivity.py  Ω_i per quantized linear (Hutchinson Hessian trace, Fisher, input-Hessian proxy)
  cost.py         Δ_i(c) = ||Q_c(W_i) - W_i||², the output-weighted Δ_out,i(c) = K tr(ΔW A ΔWᵀ)/tr(A), and
                  exact bytes of each candidate width c
  allocate.py     exact min Σ Ω_i Δ_i(c_i) s.t. Σ bytes_i ≤ budget (multiple-choice knapsack DP)
  plan.py         budget (--bits 2.5 / --target-size) -> per-layer overrides, and the plan as a recipe
  plot.py         perplexity against bits per weight from bench records (PNG, needs matplotlib)
"""

from .allocate import Allocation, allocate, solve, tie_units
from .cost import COSTS, CostTable, check_cost, measure_costs, output_error, parse_candidates, spec_bytes
from .plan import Budget, MixedPlan, allocate_plan, make_budget, parse_size, plan_mixed, tie_groups, write_plan_recipe
from .sensitivity import KINDS, Sensitivity, fisher, hutchinson, hutchinson_probes

__all__ = ["Allocation", "Budget", "COSTS", "CostTable", "KINDS", "MixedPlan", "Sensitivity", "allocate", "allocate_plan",
           "check_cost", "fisher", "hutchinson", "hutchinson_probes", "make_budget", "measure_costs", "output_error",
           "parse_candidates", "parse_size", "plan_mixed", "solve", "spec_bytes", "tie_groups", "tie_units", "write_plan_recipe"]
