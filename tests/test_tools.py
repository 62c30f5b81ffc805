"""The sampler picture, the benchmark, and the image-folder data path."""
import json
import os

import pytest
import torch
from PIL import Image

import main_pretrain
from bench import speed as bench
from tools import show_aps


def test_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "pairs.png"
    show_aps.main(show_aps.get_args_parser().parse_args(["--num-pairs", "2", "--tile", "64", "--out", str(out)]))
    img = Image.open(out)
    assert img.size[0] > 3 * 64 and img.size[1] > 2 * 64
    line = capsys.readouterr().out
    assert "covered fraction" in line and "uniform" in line


def test_bench_prints_json_lines(capsys):
    args = bench.get_args_parser().parse_args(
        ["--device", "cpu", "--archs", "vit-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
         "--sampler-batch", "16", "--loop-pairs", "4", "--img-size", "16", "--patch-size", "4",
         "--pipeline-archs", "vit-tiny", "--pipeline-batches", "1", "--workers", "0", "--moco-arch", "resnet18",
         "--moco-batch", "4", "--moco-img-size", "32", "--peak-tflops", "1", "--moco-jpeg", "--profile", "1"])
    results = bench.main(args)
    kinds = [r["bench"] for r in results]
    assert kinds == ["aps_sampler", "aps_step", "aps_augment", "aps_pipeline", "aps_pipeline", "aps_ratio",
                     "moco_pipeline", "moco_pipeline", "moco_ratio", "moco_pipeline", "moco_pipeline",
                     "moco_jpeg_ratio", "targets"]
    assert results[0]["pairs_per_s"] > 0 and results[0]["loop_pairs_per_s"] > 0
    step = results[1]
    assert step["pairs_per_s"] > 0 and step["peak_mem_mib"] > 0
    split = step["time_split"]                                  # the profiled step's time by kernel kind
    assert split["matmul"] > 0 and split["attention"] > 0 and split["other"] >= 0
    assert split["matmul"] + split["attention"] + split["other"] == pytest.approx(1.0, abs=2e-3)
    top = [t for _, t in split["top_ms"]]
    assert top == sorted(top, reverse=True) and top[0] > 0
    assert any(name in ("aten::mm", "aten::addmm") for name, _ in split["top_ms"])
    # FLOPs by hand: 2 views x (forward + backward = 3 x 2 flops per multiply-add) over the block and head
    # matmuls; 16 px / patch 4 = 16 cells, 25 % kept = 4 tokens + cls (attention and patch embedding: < 2 %)
    from models import APS, create_vit
    model = APS(create_vit("vit-tiny", 16, 4))
    blocks = sum(p.numel() for n, p in model.encoder.blocks.named_parameters() if n.endswith("weight") and p.dim() == 2)
    heads = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("projector", "predictor"))
                and p.dim() == 2)
    D, depth = model.encoder.embed_dim, len(model.encoder.blocks)
    last = 5 * 2 * D * D + 1 * 10 * D * D          # the last block: keys/values of 5 tokens, the rest for cls only
    by_hand = 2 * 6 * (5 * blocks * (depth - 1) / depth + last + heads)
    assert step["gflops_per_pair"] * 1e9 == pytest.approx(by_hand, rel=0.02)
    assert step["mfu"] == pytest.approx(step["gflops_per_pair"] * 1e9 * step["pairs_per_s"] / 1e12, abs=1e-4)  # 4 decimals
    paths = {r["path"]: r for r in results if r["bench"] == "moco_pipeline"}
    assert set(paths) == {"cpu", "device", "jpeg-cpu", "jpeg-device"} and all(r["img_per_s"] > 0 for r in paths.values())
    ratios = {r["bench"]: r for r in results if r["bench"].endswith("_ratio")}
    pairs = ((ratios["moco_ratio"], ("device", "cpu")), (ratios["moco_jpeg_ratio"], ("jpeg-device", "jpeg-cpu")))
    for ratio, (dev, cpu) in pairs:
        assert ratio["device_over_cpu"] == pytest.approx(paths[dev]["img_per_s"] / paths[cpu]["img_per_s"],
                                                         rel=0.05)  # from rounded rates
    for ratio, (dev, cpu) in pairs:
        assert ratio["cpu_data_over_training"] == pytest.approx(
            paths[cpu]["data_img_per_s"] / paths[cpu]["img_per_s"], rel=0.05)
        assert paths[dev]["data_img_per_s"] > paths[dev]["img_per_s"]     # the loader alone outruns loader + model
    aps = {r["path"]: r for r in results if r["bench"] == "aps_pipeline"}
    assert all(r["data_pairs_per_s"] > r["pairs_per_s"] for r in aps.values())
    assert ratios["aps_ratio"]["batch"] == 2 and ratios["aps_ratio"]["amp"] == "float32"
    checks = results[-1]["checks"]                             # on a CPU: each device path >= its CPU path
    assert [c["measured"] for c in checks] == [ratios["aps_ratio"]["device_over_cpu"],
                                               ratios["moco_ratio"]["device_over_cpu"]]
    assert [c["met"] for c in checks] == [c["measured"] >= 1.0 for c in checks]
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines if line.startswith("{")] == results     # one JSON line each


def test_bench_targets_read_the_records_of_the_target_shapes():
    from bench.targets import check_targets
    aps = {"batch": 512, "img_size": 32, "patch": 2, "amp": "bfloat16"}
    results = [{"bench": "aps_step", "arch": "vit-tiny", "mfu": 0.5, **aps},
               {"bench": "aps_step", "arch": "vit-small", "mfu": 0.36, **aps},
               {"bench": "aps_ratio", "arch": "vit-small", "device_over_cpu": 0.98, "augment_over_training": 20.0,
                **aps},
               {"bench": "moco_ratio", "arch": "resnet50", "device_over_cpu": 2.4, "batch": 128, "img_size": 224,
                "amp": "bfloat16"}]
    report = check_targets(results, gpu=True, device_name="NVIDIA H100 80GB HBM3")
    got = [(c["measured"], c["met"], c.get("at_spec_shape")) for c in report["checks"]]
    assert got == [(0.36, True, True), (0.98, False, True), (20.0, True, True), (2.4, True, False)]
    assert report["all_met"] is False and report["device_name"].startswith("NVIDIA H100")
    results[2]["device_over_cpu"] = 3.0
    assert check_targets(results, gpu=True)["all_met"] is True
    del results[1]["mfu"]                                      # unknown peak FLOP/s: no MFU, not met either
    report = check_targets(results, gpu=True)
    assert report["checks"][0]["measured"] is None and report["checks"][0]["met"] is None
    assert report["all_met"] is False
    cpu = check_targets([{"bench": "aps_ratio", "arch": "vit-tiny", "device_over_cpu": 0.97},
                         {"bench": "aps_ratio", "arch": "vit-small", "device_over_cpu": 1.1}], gpu=False)
    assert [(c["arch"], c["measured"], c["met"]) for c in cpu["checks"]] == [
        ("vit-tiny", 0.97, False), ("vit-small", 1.1, True), (None, None, None)]        # no MoCo record
    assert cpu["all_met"] is False


def test_imagefolder_pretraining_runs(tmp_path, tiny_flags, make_folder):
    make_folder(tmp_path / "data")
    flags = [f for f in tiny_flags]
    argv = flags + ["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--img-size", "32",
                    "--batch-size", "4", "--num-workers", "0", "--nepoch", "1", "--warmup-epochs", "1",
                    "--knn-every", "1", "--output-dir", str(tmp_path / "out")]
    metrics = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    assert 0.0 <= metrics["knn_top1"] <= 100.0
    assert os.path.isfile(tmp_path / "out" / "checkpoint.pth")


def test_imagefolder_on_the_device_path_pretrains_and_trains_moco(tmp_path, tiny_flags, make_folder):
    """--data-path device on a folder: workers read the files, the device decodes and crops image by image."""
    import main_moco
    make_folder(tmp_path / "data")
    argv = tiny_flags + ["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--img-size", "32",
                         "--batch-size", "4", "--num-workers", "1", "--nepoch", "1", "--warmup-epochs", "1",
                         "--knn-every", "1", "--data-path", "device", "--output-dir", str(tmp_path / "aps")]
    metrics = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    assert 0.0 <= metrics["knn_top1"] <= 100.0 and os.path.isfile(tmp_path / "aps" / "checkpoint.pth")
    argv = ["-a", "resnet18", "--img-size", "16", "--batch-size", "4", "--moco-k", "8", "--moco-dim", "8",
            "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "1", "--device", "cpu", "--knn-every", "0",
            "--bn-splits", "2", "--data-path", "device", "--enable-asymm-aug", "--enable-multicrop",
            "--num-mini-crops", "2",
            "--output-dir", str(tmp_path / "moco"), str(tmp_path / "data")]
    main_moco.main(main_moco.get_args_parser().parse_args(argv))
    assert os.path.isfile(tmp_path / "moco" / "checkpoint.pth")
    for run in ("aps", "moco"):
        assert "data path device" in (tmp_path / run / "log.txt").read_text()


def test_same_runs_compares_checkpoints_bit_for_bit(tmp_path):
    from tools.same_runs import compare_checkpoint
    base = {"model": {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}, "epoch": 1, "args": {"nepoch": 1},
            "metrics": {"train_img_per_s": 5.0, "train_loss": 0.5}, "rng": None}

    def saved(name, **change):
        ckpt = {**base, **change}
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)
    a = saved("a.pth")
    # the flags as saved and the machine's speed are no part of what was trained
    assert compare_checkpoint(a, saved("b.pth", args={"epochs": 1}, metrics={"train_img_per_s": 9.0,
                                                                          "train_loss": 0.5})) == []
    for name, change, where in [
            ("sign", {"model": {"w": torch.tensor([1.0, -0.0]), "n": torch.tensor(3)}}, ".model.w"),   # -0.0 != 0.0
            ("ulp", {"model": {"w": torch.tensor([float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))), 0.0]),
                               "n": torch.tensor(3)}}, ".model.w"),
            ("dtype", {"model": {"w": torch.tensor([1.0, 0.0], dtype=torch.float64), "n": torch.tensor(3)}},
             ".model.w"),
            ("loss", {"metrics": {"train_img_per_s": 5.0, "train_loss": 0.25}}, ".metrics.train_loss"),
            ("epoch", {"epoch": 2}, ".epoch")]:
        diffs = compare_checkpoint(a, saved(f"{name}.pth", **change))
        assert len(diffs) == 1 and diffs[0].startswith(where), (name, diffs)


def test_the_reference_step_computes_our_loss_with_two_encoder_calls():
    from models import APS, create_vit
    from bench.pipeline import reference_step_loss
    torch.manual_seed(0)
    model = APS(create_vit("vit-tiny", 16, 4, depth=2, embed_dim=32, num_heads=2), 32, 16, 32)
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    idx1, idx2 = torch.rand(6, 16).argsort(1)[:, :4], torch.rand(6, 16).argsort(1)[:, :4]
    ours, _ = model(x1, x2, idx1, idx2)                        # the encoder once over both views
    assert torch.allclose(reference_step_loss(model, x1, x2, idx1, idx2), ours, atol=1e-5)


def test_gpu_report_keeps_json_lines_and_sets_other_lines_aside():
    from bench.gpu_report import json_lines
    records, other = json_lines('{"a": 1}\n{not json\nwarning: x\n[1, 2]\n  {"b": 2}\n')
    assert records == [{"a": 1}, {"b": 2}] and other == ["{not json", "warning: x", "[1, 2]"]


def test_profile_split_knows_hopper_kernel_names():
    from bench.speed import kernel_kind
    assert kernel_kind("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"                   # H100/H200 cuBLAS
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1") == "matmul"
    assert kernel_kind("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...gemm...>>") == "attention"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == "other"


def test_gpu_report_runs_every_phase_at_small_shapes_and_survives_a_failing_one(tmp_path, monkeypatch):
    from bench import gpu_report
    # a phase that exits at once (an unknown flag): recorded as failed, and every later phase still runs
    monkeypatch.setitem(gpu_report.SMALL, "moco", gpu_report.SMALL["moco"] + ["--no-such-flag"])
    summary = gpu_report.main(gpu_report.get_args_parser().parse_args(["--out", str(tmp_path), "--small"]))
    phases = {p["phase"]: p for p in summary["phases"]}
    assert [p["phase"] for p in summary["phases"]] == list(gpu_report.ORDER)
    assert sum(gpu_report.LIMITS.values()) <= 480                  # the phases' limits fit 8 minutes
    for name in ("eager", "compiled", "pipelines", "memory"):
        assert phases[name]["exit"] == 0, phases[name]
    assert phases["moco"]["exit"] == 2 and "--no-such-flag" in phases["moco"]["error"][-1]
    assert phases["tests"]["exit"] in (0, 5)                    # 5: no CUDA-marked test in the suite
    compiled = [json.loads(line) for line in (tmp_path / "compiled.jsonl").read_text().splitlines()]
    assert next(r for r in compiled if r["bench"] == "aps_step")["compile"] == "default"
    memory = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert [r["saving"] for r in memory if r["bench"] == "memory"] == ["none", "accum-2"]
    records = [json.loads(line) for line in (tmp_path / "pipelines.jsonl").read_text().splitlines()]
    ref = next(r for r in records if r["bench"] == "aps_reference_pipeline")
    ratio = next(r for r in records if r["bench"] == "aps_reference_ratio")
    ours = max((r for r in records if r["bench"] == "aps_pipeline"), key=lambda r: r["pairs_per_s"])
    assert ref["amp"] == "float16" and ref["workers"] == 1 and ref["pairs_per_s"] > 0
    assert ratio["ours_over_reference"] == pytest.approx(ours["pairs_per_s"] / ref["pairs_per_s"], rel=0.01)
    assert ratio["projected_1600_epoch_hours"] == pytest.approx(1600 * 50000 / ours["pairs_per_s"] / 3600, rel=0.01)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert next(p for p in saved["phases"] if p["phase"] == "eager")["targets"]["bench"] == "targets"
    assert saved["versions"]["torch"] == torch.__version__ and saved["phases"][0]["phase"] == "correctness"
    assert saved["correctness"] == {"all_passed": True, "checks": {"train/pretrain/bf16": "pass"}, "errors": {},
                                    "cuda_tests": phases["tests"]["result"]}
    text = (tmp_path / "summary.txt").read_text().splitlines()
    assert len(text) <= 20 and text[1].startswith("correctness: all passed (1 pass, 0 FAIL")
    assert any(line.startswith("moco: FAILED (exit 2)") for line in text)
    assert any(line.startswith("memory: ok") for line in text)
    from bench.targets import check_targets
    gpu = check_targets([{**ratio, "arch": "vit-small", "batch": 512, "img_size": 32, "patch": 2}], gpu=True)
    check = next(c for c in gpu["checks"] if c["target"].startswith("APS ViT-S/2 epoch end to end"))
    assert check["measured"] == ratio["ours_over_reference"] and check["at_spec_shape"] is True


def test_bench_times_a_jpeg_folder_against_its_shards():
    from bench.files import files_vs_shards
    records = files_vs_shards(images=32, size=48, crop=32, batch=8, batches=2, workers=(0,))
    assert [(r["source"], r["workers"]) for r in records] == [("folder", 0), ("shards", 0)]
    assert all(r["img_per_s"] > 0 and r["bench"] == "files_vs_shards" for r in records)


def test_gpu_checks_record_a_failing_raising_or_exiting_check_and_run_the_next(tmp_path, monkeypatch):
    """Each check is isolated: a check that fails, raises, exits (a script's UserError, a non-finite loss) or
    depends on one that failed is recorded as FAIL with its last line, and the checks after it still run and are
    written to checks.jsonl as they end."""
    import sys as _sys
    from bench import gpu_checks
    from utils.errors import UserError

    def script_exits():                              # what a script's bad flag or non-finite loss does
        return gpu_checks.run_script("main_pretrain", ["--nepoch", "0"])

    def non_finite():
        raise UserError("loss became non-finite at step 3 (epoch 1)")
    planted = {"fails": lambda: (False, {"why": "planted"}), "raises": lambda: 1 / 0, "exits": lambda: _sys.exit(3),
               "script-exits": script_exits, "non-finite": non_finite, "passes": lambda: (True, {})}
    monkeypatch.setattr(gpu_checks, "EXTRA_CHECKS", planted)
    monkeypatch.setattr(gpu_checks, "train_checks", lambda *a, **k: None)      # (the planted checks only)
    records = gpu_checks.main(gpu_checks.get_args_parser().parse_args(["--out", str(tmp_path), "--small"]))
    got = {r["check"]: r for r in records}
    assert [r["check"] for r in records] == list(planted)
    assert [got[k]["passed"] for k in planted] == [False, False, False, False, False, True]
    assert got["raises"]["error"].startswith("ZeroDivisionError") and got["exits"]["error"] == "exit 3"
    assert got["script-exits"]["error"].startswith("exit 2") and "--nepoch" in got["script-exits"]["error"]
    assert "non-finite" in got["non-finite"]["error"]
    saved = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert saved == records


def test_gpu_checks_do_not_hand_a_failed_runs_checkpoint_on_and_stop_at_their_budget(tmp_path):
    from bench.gpu_checks import Checks, check
    out = Checks(str(tmp_path))
    check("train/moco/bf16", lambda: (False, {}), out)
    check("train/lincls/bf16", lambda: (True, {}), out, needs="train/moco/bf16")
    assert out.records[1]["passed"] is False and "needs train/moco/bf16" in out.records[1]["error"]
    late = Checks(str(tmp_path), deadline=0.0)                       # past its budget: recorded, not run
    check("jpeg", lambda: (True, {}), late)
    assert late.records == [{"check": "jpeg", "passed": None, "skipped": "no time left in the phase", "seconds": 0.0}]


def test_the_gpu_report_keeps_its_old_command():
    """python3 -m tools.gpu_report (the name GPU sessions are told to run) is bench.gpu_report."""
    import bench.gpu_report
    from tools import gpu_report as old
    assert old.main is bench.gpu_report.main and old.get_args_parser is bench.gpu_report.get_args_parser
