"""The order every script's main follows, written once: start (processes, device, dataset preset) -> the script's
own checks -> begin (seed, output folder, logger, precision) -> training data -> the script's model -> the kNN
monitor -> the script's method -> Trainer -> finish (closing line, report.md, curves.png). A script holds its flags,
its checks, its model and its method, and calls these steps in this order:

    run = Run(args)                                  # torchrun's processes, the device, the dataset's preset
    ...                                              # the script's checks of its flags (one line each)
    run.begin()                                      # same initial weights on every rank; logs every flag
    data = run.training_data(views)
    module = run.place(MyModel(...), sync_bn=True)   # on the device; SyncBN under several processes
    run.init_weights(module.encoder, whole=module)   # --init-weights FILE, when the script offers it
    knn = run.knn(module.encoder)                    # the pretraining scripts' monitor (or None)
    method = MyMethod(module, run.parallel(module), lr, args.epochs, knn, model_config)
    return run.train(method, optimizer, "what trains", lr, identity=("dataset", "arch", "img_size"))
"""
from data import apply_preset
from data.pipeline import knn_setup, training_data
from engine import Trainer, TrainSettings
from models.norm import convert_sync_batchnorm
from models.registry import is_registry_name
from models.warmstart import warm_start
from utils.checkpoint import find_resume_path
from utils.dist import data_parallel, get_world_size, init_distributed
from utils.errors import UserError
from utils.flags import input_weights
from utils.report import RunReporter
from utils.run import describe_run, start_run
from utils.runtime import amp_dtype, seed_everything
from utils.trackers import parse_loggers, require


def add_init_weights_arg(group):
    """--init-weights FILE: a new run from other weights (any file the reader takes), on a fresh schedule."""
    group.add_argument("--init-weights", type=input_weights(empty="a random init", registry=is_registry_name),
                       default="", metavar="FILE",
                       help="start a new run from the backbone of FILE (ours, a release, timm, torchvision, MAE, "
                            "MoCo v3, DINO, a hub folder), and from its heads where a checkpoint of this method "
                            "fits; the schedule, optimiser and epochs start fresh (docs/WEIGHTS.md#warm-starts)")


class Run:
    def __init__(self, args):
        self.args = args
        if getattr(args, "init_weights", "") and args.resume:
            raise UserError("--resume and --init-weights together: --resume continues a run, --init-weights starts a "
                            "new one from other weights; pass one of them")
        require(parse_loggers(getattr(args, "logger", "tensorboard")))   # a missing tracker: one line, first
        self.device = init_distributed(args.device, args.deterministic)
        self.preset = apply_preset(args) if "dataset" in vars(args) else None   # (a script of its own data flags)
        self.amp, self.data, self.logger, self.notes = None, None, None, []

    def begin(self):
        """Seed (the same initial weights on every rank and every run), create the output folder, log every flag;
        the precision of --amp on this device."""
        seed_everything(self.args.seed)
        self.logger = start_run(self.args)
        self.amp = amp_dtype(self.args.amp, self.device)
        return self

    def training_data(self, recipe, **options):
        """data.pipeline.training_data of the run's flags (options: holdout, on_device, few_labels)."""
        self.data = training_data(self.args, recipe, self.device, **options)
        return self.data

    def place(self, module, sync_bn: bool = False):
        """The module on the run's device; sync_bn: its batch norms synchronised over the processes when there are
        several (statistics over the global batch, as with one process)."""
        module = module.to(self.device)
        return convert_sync_batchnorm(module, self.device) if sync_bn and get_world_size() > 1 else module

    def parallel(self, module):
        """What the method calls: the module under DDP when there are several processes, else itself."""
        return data_parallel(module, self.device)

    def init_weights(self, backbone, whole=None, fresh=()) -> bool:
        """--init-weights: `backbone` (or `whole`, from one of our checkpoints of the same method, but for the
        entries under `fresh`) from the file; the line saying what was loaded is a note (logged, in report.md).
        False when there is nothing to load (no flag, or a checkpoint in the output folder that the run resumes)."""
        source = getattr(self.args, "init_weights", "")
        if not source:
            return False
        if find_resume_path("", self.args.output_dir):
            self.logger.info(f"--init-weights {source} not applied: the run resumes from its checkpoint in "
                             f"{self.args.output_dir}")
            return False
        self.notes.append(warm_start(source, backbone, whole, fresh))     # logged when training starts, and reported
        return True

    def knn(self, backbone):
        """The pretraining scripts' kNN monitor of `backbone` (None when --knn-every 0, or with a note for
        report.md when there are no labels to monitor with)."""
        knn, notes = knn_setup(self.args, self.preset, self.device, backbone, self.amp, self.data)
        self.notes += notes
        return knn

    def describe(self, what: str, lr: float, details: dict = None) -> str:
        return describe_run(what, self.data, lr, self.device, self.amp, details)

    def train(self, method, optimizer, what: str, lr: float, details: dict = None, eval_every: int = None,
              identity=(), lr_flag: str = "--lr", known_ranges: dict = None, loader=None) -> dict:
        """Train `method` (optimizer: a utils.optim.OptimizerSpec) to the end, or to the dry run's one forward
        pass, and finish; the last metrics. what/lr/details: the opening line (utils.run.describe_run); eval_every:
        default --knn-every; identity: the flags a found checkpoint must share to be resumed; loader: default the
        training data's."""
        args = self.args
        settings = TrainSettings.from_args(args, args.knn_every if eval_every is None else eval_every,
                                           self.describe(what, lr, details), self.notes, identity=identity,
                                           lr_flag=lr_flag, known_ranges=known_ranges)
        trainer = Trainer(method, optimizer, self.data.loader if loader is None else loader, settings, self.device,
                          self.amp, RunReporter(args.output_dir))
        return trainer.finish(trainer.fit())
