"""Studies built on the simulator: scenarios, evaluator construction, schedule search,
sensitivity campaigns, the paper reproduction and the benchmark suite."""
