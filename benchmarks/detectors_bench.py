"""Cost of the one-step detectors (`memjax.scan --detectors`): per detector and combined.

    python benchmarks/detectors_bench.py --models=medium --batch=8 --repeats=5

For each model (tiny random folders from `memjax.testing.tiny`; "medium" is
SD1-shaped, 17M UNet params at 32 x 32 latents, and has SD's Ren layer
`down_blocks.1.attentions.1`), builds the scan stage's own step
(`memjax.stages.scan.make_step`, one device) for: the DCS alone (what every scan
computes), the DCS plus each detector alone, and the DCS plus every detector in one
program. In one run it reports, per configuration:

- XLA's FLOP count of the compiled step, and the detector's cost in UNet
  forward-equivalents: (flops(DCS + detector) - flops(DCS)) / flops(one UNet
  forward at the batch), the forward measured as a step of its own;
- prompts/s (median over --repeats, every configuration timed in turn within each
  repeat so that load falls on all alike) and the marginal seconds per prompt.

Combined against separate: T(all in one program) against the sum, over the
detectors, of T(DCS + that detector) (one scan per detector, each paying its own
text encoder pass and DCS), and against T(DCS) + the sum of the marginal costs (what
sharing the conditional forward at (z, t_first) saves between wen981, asthana,
jeon and ren_le). `all_authors` is every detector under the authors' noise protocol
(the scan's default): its per-prompt noises cannot share an unconditional pass.
"""
import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models  # pylint: disable=g-import-not-at-top  # benchmarks/bench_models.py
import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py


def _step(sd, noise, batch, detectors, ren_layer, plan=None):
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  step = scan.make_step(sd, noise, 7.5, batch, distributed.local_mesh(1), detectors, ren_layer,
                        plan)
  _, compile_s, flops = bench_timing.compile_step(step)
  return step, compile_s, flops


def run(args):
  import jax  # pylint: disable=g-import-not-at-top
  from memjax.method import detectors as detectors_lib  # pylint: disable=g-import-not-at-top
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  rows = []
  for name in args.models.split(","):
    style, ren_layer = {"tiny": ("sd1", "down_blocks.0.attentions.0"),
                        "medium": ("medium", "down_blocks.1.attentions.1")}[name]
    folder = tiny.build_tiny_model(os.path.join(tempfile.mkdtemp(), name), style,
                                   num_merges=2000)
    sd = loading.load_stable_diffusion(folder, "float32", ("unet", "text_encoder"))
    noise = noise_lib.noise_for_seeds(range(args.seeds), sd.latent_shape_chw)
    ids = bench_models.random_ids(args.batch)
    unet_fwd = bench_models.unet_step(sd, noise[:1], args.batch, distributed.local_mesh(1))
    _, _, fwd_flops = bench_timing.compile_step(unet_fwd)
    configs = {"dcs": ()}
    configs.update({d: (d,) for d in detectors_lib.ONE_STEP})
    configs["all"] = detectors_lib.ONE_STEP  # every detector on the shared z of each seed
    steps = {k: _step(sd, noise, args.batch, v, ren_layer) for k, v in configs.items()}
    # The authors' protocol (the scan's default): wen981 on 4 noises of each prompt's
    # own, ren_le on 1 (no shared unconditional pass), jeon and asthana on 1 shared z.
    authors = detectors_lib.noise_plan(detectors_lib.ONE_STEP, "authors", len(noise))
    steps["all_authors"] = _step(sd, noise, args.batch, detectors_lib.ONE_STEP, ren_layer,
                                 authors)
    rows_in = {k: ids for k in steps}
    rows_in["all_authors"] = np.concatenate(
        [ids, noise_lib.prompt_words(np.arange(args.batch))], axis=1)
    times = dict(zip(steps, bench_timing.median_seconds(
        [lambda k=k, s=s: bench_timing.run_step(s[0], rows_in[k]) for k, s in steps.items()],
        args.repeats)))
    per_prompt = {k: t / args.batch for k, t in times.items()}
    base_flops = steps["dcs"][2]
    for k, (step, compile_s, flops) in steps.items():
      rows.append({
          "model": name, "config": k, "batch": args.batch, "seeds": args.seeds,
          "latents": "x".join(map(str, sd.latent_shape_chw[1:])),
          "compile_s": round(compile_s, 2), "gflop_per_call": round(flops / 1e9, 3),
          "unet_forward_equivalents": (round((flops - base_flops) / fwd_flops / args.seeds, 2)
                                       if k != "dcs" else 1.0),
          "prompts_per_s": round(1 / per_prompt[k], 2),
          "ms_per_prompt_beyond_dcs": round(1e3 * (per_prompt[k] - per_prompt["dcs"]), 2)})
      print(json.dumps(rows[-1]), flush=True)
    separate = sum(per_prompt[d] for d in detectors_lib.ONE_STEP)
    marginal = per_prompt["dcs"] + sum(per_prompt[d] - per_prompt["dcs"]
                                       for d in detectors_lib.ONE_STEP)
    rows.append({"model": name, "combined_s_per_prompt": round(per_prompt["all"], 4),
                 "separate_scans_s_per_prompt": round(separate, 4),
                 "dcs_plus_marginals_s_per_prompt": round(marginal, 4),
                 "combined_over_separate": round(per_prompt["all"] / separate, 3),
                 "combined_over_marginals": round(per_prompt["all"] / marginal, 3),
                 "unet_forward_gflop": round(fwd_flops / 1e9, 3),
                 "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                            f"jax {jax.__version__} {jax.default_backend()}"})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="medium")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="JSON file for the rows")
  args = parser.parse_args()
  rows = run(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
