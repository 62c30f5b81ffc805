"""Benchmarks and GPU checks, kept out of the training path: nothing in a script, the loop or a method imports them.

    python -m bench                            # the benchmark (bench/speed.py): throughput, memory, MFU, targets
    python3 -m bench.gpu_report --out DIR      # a GPU session's one command (also as python3 -m tools.gpu_report)
    python -m bench.gpu_checks --out DIR       # its correctness phase alone
"""
