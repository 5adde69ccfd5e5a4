"""The simulator: accelerator mapping, arithmetic, fault models, the faulty GEMM, faulty
layers and the evaluation engine. Nothing here loads files or knows about the CLI."""
