"""Thin LightningModules; networks arrive by injection from configs."""
