"""python3 -m tools.gpu_report: the GPU session's one command, kept under its old name (bench/gpu_report.py)."""
from bench.gpu_report import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
