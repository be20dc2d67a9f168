"""Benchmark and profiling library behind `dit-fast bench|parity|kernels|profile` (results as JSON, Markdown, PNG).

    flops       exact GEMM work of a DiT, SiT or LightningDiT config (the paper's 118.6 GMACs for DiT-XL/2 at 256px)
    env         environment record (device, versions, commit) and measured ceilings (copy GB/s, bf16 GEMM)
    timing      the one timing helper (CUDA events / do_bench, perf_counter on the CPU; median of repeats)
    contenders  what is compared (reference eager / compiled / compiled per block, dit_fast per backend) and one
                step per mode (the family's objective in training)
    throughput  images/s, TFLOP/s, MFU, peak memory per contender and mode (training on one shared set of weights)
    parity      output and gradient errors of dit_fast against the reference, judged against fp64
    kernels     per-op microbenchmarks with an explicit byte model (kernel_variants: LightningDiT's adaLN modes)
    sampling    sampling latency: the published loops against dit_fast.sample / sample_flow (flow_sampling)
    profile     torch.profiler kernel tables, Chrome traces, per-block-segment ranges (hooks, no model edits)
    report      JSON / Markdown / PNG writers
"""
