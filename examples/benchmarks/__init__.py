"""Benchmarks: XLA cost-analysis FLOPs of PEFT vs full fine-tuning train steps."""
