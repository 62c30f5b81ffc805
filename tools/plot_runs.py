"""Several runs' curves overlaid: loss, lr, positive cosine, kNN / test top-1 against epochs, from each output
folder's log.jsonl.

    python -m tools.plot_runs output/aps-s output/aps-s-ratio0.5 --out compare.png
"""
import os

from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.plots import plot_runs
from utils.flags import input_folder, output_file, text


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.plot_runs")
    p.add_argument("dirs", type=input_folder(), nargs="+", help="output folders of runs (each with its log.jsonl)")
    p.add_argument("--out", type=output_file(), default="runs.png", help="the PNG to write")
    p.add_argument("--title", type=text(), default="", help="a title over the panels")
    return p


@exit_on_user_error
def main(args):
    logs = {}
    for d in args.dirs:
        log = os.path.join(d, "log.jsonl")
        if not os.path.isfile(log):
            raise UserError(f"{d} holds no log.jsonl; pass the --output-dir of a run")
        label = os.path.basename(os.path.normpath(d))
        logs[label if label not in logs else d] = log
    panels = plot_runs(logs, args.out, args.title)
    if not panels:
        raise UserError(f"the logs of {', '.join(args.dirs)} hold no epoch yet; plot them after their first epoch")
    print(f"wrote {args.out}: {len(logs)} run(s), {', '.join(panels)}")
    return args.out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
