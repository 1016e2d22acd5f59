"""Manual check of issue 18's acceptance scenario: recipes/vit_b16_mars.yaml (model swapped for timm's test_vit with
seeded 'pretrained' weights; real Fashion-MNIST) with every knob on incl. EMA and bf16, under zero3.yaml and
zero3_init.yaml on 2 processes: uninterrupted vs SIGKILLed after checkpoint step 4 + resumed -> same final weights
(export/ = EMA and export_raw/), and `mars-dist certify` passes on both exports against the pretrained file.

    .venv/bin/python bench/vit_recipe_kill_resume.py [OUT_DIR] zero3_init.yaml zero3.yaml
Writes OUT_DIR/result.json (default runs/vit_recipe_kill_resume/); the committed one is bench/results/."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import torch, timm
from safetensors.torch import save_file, load_file

ROOT = Path(__file__).resolve().parent.parent
ARGS = sys.argv[1:]
OUT = Path(ARGS.pop(0)) if ARGS and not ARGS[0].endswith(".yaml") else ROOT / "runs" / "vit_recipe_kill_resume"
OUT.mkdir(parents=True, exist_ok=True)
weights = OUT / "test_vit.safetensors"
torch.manual_seed(0)
m = timm.create_model("test_vit", num_classes=10)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(weights))
SWAP = ["model.name=test_vit", f"model.pretrained={weights}", "data.name=fashion-mnist", "data.path=null",
        "data.image_size=160", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
        "train.batch_size=4", "train.max_steps=8", "train.warmup_steps=2", "train.log_every=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10", "tracking.wandb_mode=disabled",
        "constraint.radius=0.005", "constraint.head_radius=0.01", "ema.decay=0.9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
port = [29700]

def cmd(cfg, out, extra=()):
    port[0] += 7
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/accelerate" / cfg),
            "--num_processes", "2", "--main_process_port", str(port[0]), "-m", "mars_dist", "train",
            str(ROOT / "recipes/vit_b16_mars.yaml"), *SWAP, f"output_dir={out}", *extra]

def run(c, log):
    with open(log, "w") as f:
        return subprocess.run(c, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT).returncode

result = {}
for cfg in ARGS:
    whole, part = OUT / f"{cfg}_whole", OUT / f"{cfg}_part"
    t0 = time.time()
    rc = run(cmd(cfg, whole), OUT / f"{cfg}_whole.log")
    assert rc == 0, f"{cfg} whole rc {rc}"
    # the interrupted run: SIGKILL the launch's process group once step 4's checkpoint is complete
    with open(OUT / f"{cfg}_part1.log", "w") as f:
        p = subprocess.Popen(cmd(cfg, part), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        ck = part / "checkpoints" / "step_00000004"
        while p.poll() is None and not (ck / "MANIFEST.json").exists():
            time.sleep(0.5)
        time.sleep(1.0)  # into update 5
        os.killpg(p.pid, signal.SIGKILL); p.wait()
    killed_at = sorted(x.name for x in (part / "checkpoints").iterdir())
    rc = run(cmd(cfg, part, ["resume=auto"]), OUT / f"{cfg}_part2.log")
    assert rc == 0, f"{cfg} resume rc {rc}"
    same = {}
    for folder in ("export", "export_raw"):
        a = load_file(str(whole / folder / "model.safetensors")); b = load_file(str(part / folder / "model.safetensors"))
        same[folder] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cert = {}
    for folder in ("export", "export_raw"):
        for r, d in (("whole", whole), ("part", part)):
            pr = subprocess.run([sys.executable, "-m", "mars_dist", "certify", str(d / folder), "--pretrained", str(weights),
                                 "--json", str(OUT / f"{cfg}_{r}_{folder}_cert.json")], cwd=ROOT, env=ENV,
                                capture_output=True, text=True)
            cert[f"{r}/{folder}"] = (pr.returncode, pr.stdout.strip().splitlines()[-1] if pr.stdout.strip() else pr.stderr[-300:])
    s = json.loads((part / "summary.json").read_text())
    result[cfg] = {"checkpoints_at_kill": killed_at, "bit_identical": same, "certify": cert,
                   "summary_ema": s.get("ema"), "updates": s["updates"], "seconds": round(time.time() - t0)}
    print(json.dumps({cfg: result[cfg]}, indent=1), flush=True)
(OUT / "result.json").write_text(json.dumps(result, indent=1))
