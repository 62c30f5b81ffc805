"""python -m bench: the benchmark (bench/speed.py)."""
from bench.speed import get_args_parser, main

main(get_args_parser().parse_args())
