"""Helpers shared by the cross-package tests."""

from __future__ import annotations


def quant_recipe(scheme: str, ignore=("lm_head",), modifier: str = "QuantizationModifier") -> dict:
    return {"quant_stage": {"quant_modifiers": {modifier: {"targets": ["Linear"], "scheme": scheme, "ignore": list(ignore)}}}}
