"""`mars-dist predict EXPORT_DIR IMAGE_OR_FOLDER ... [--top-k K] [--output predictions.csv]`: class labels with
probabilities for images and folders of images (searched recursively), with the export's own preprocessing.

Rows are written (and flushed) batch by batch, so an interruption keeps every prediction made so far. An image that
cannot be read or decoded is reported by path (on stderr and in the `error` column) and skipped; the rest go on.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from PIL import Image, ImageOps


def collect_images(inputs: list[str]) -> list[Path]:
    """Files given as they are; folders searched recursively for image extensions PIL knows (hidden files and
    folders skipped). A missing path or a folder without images is an error naming it."""
    exts = {e.lower() for e in Image.registered_extensions()}
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p}: no image files in this folder (extensions such as .jpg .png .webp)")
            files += found
        else:
            raise FileNotFoundError(f"{p}: no such image or folder")
    return files


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image (as datasets does: EXIF orientation applied)."""
    with Image.open(path) as im:
        im.load()
        if im.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            return ImageOps.exif_transpose(im)
        return im.copy()


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(read_image(self.files[i])), i, ""
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
            return None, i, f"{type(e).__name__}: {e}".replace("\n", " ")


def _collate(items):
    good = [(x, i) for x, i, err in items if x is not None]
    bad = [(i, err) for x, i, err in items if x is None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, [g[1] for g in good], bad


def predict(export_dir: str | Path, inputs: list[str], top_k: int = 1, output: str | Path | None = None,
            batch_size: int = 32, num_workers: int = 0, progress: bool | None = None) -> dict:
    """Write one CSV row per image (path, label, probability, label_2, probability_2, ..., error) to `output`
    (stdout when None). Returns {'images', 'predicted', 'failed': [(path, error)], 'output'}."""
    from tqdm.auto import tqdm

    from mars_dist.data.dataset import build_transforms
    from mars_dist.models.export import load_export

    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    files = collect_images(inputs)  # bad paths fail before the model loads
    exported = load_export(export_dir)
    k = min(top_k, len(exported.class_names))
    loader = torch.utils.data.DataLoader(_Images(files, build_transforms(exported.data_config, train=False)),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    header = ["path", "label", "probability"] + [f"{c}_{r}" for r in range(2, k + 1)
                                                  for c in ("label", "probability")] + ["error"]
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    stream = open(output, "w", newline="") if output is not None else sys.stdout
    failed: list[tuple[str, str]] = []
    done = 0
    show = progress if progress is not None else len(files) >= 20
    try:
        writer = csv.writer(stream)
        writer.writerow(header)
        with torch.no_grad(), tqdm(total=len(files), desc="predict", unit="img", disable=not show,
                                   file=sys.stderr) as bar:
            for x, idx, bad in loader:
                rows = {}
                if x is not None:
                    probs = exported.model(x).float().softmax(-1)
                    p, c = probs.topk(k, -1)
                    for j, i in enumerate(idx):
                        pairs = [v for r in range(k) for v in (exported.class_names[int(c[j, r])],
                                                               f"{float(p[j, r]):.6f}")]
                        rows[i] = [str(files[i])] + pairs + [""]
                    done += len(idx)
                for i, err in bad:
                    failed.append((str(files[i]), err))
                    bar.write(f"mars-dist predict: skipped unreadable image {files[i]}: {err}", file=sys.stderr)
                    rows[i] = [str(files[i])] + [""] * (2 * k) + [err]
                writer.writerows(rows[i] for i in sorted(rows))  # input order
                stream.flush()
                bar.update(len(rows))
    finally:
        if stream is not sys.stdout:
            stream.close()
    if failed:
        print(f"mars-dist predict: {len(failed)} of {len(files)} images could not be read and were skipped: "
              f"{', '.join(f for f, _ in failed[:5])}{' ...' if len(failed) > 5 else ''}", file=sys.stderr)
    if output is not None:
        print(f"mars-dist predict: {done} predictions written to {output}", file=sys.stderr)
    if done == 0:
        raise ValueError(f"none of the {len(files)} images could be read (first: {failed[0][0]}: {failed[0][1]})")
    return {"images": len(files), "predicted": done, "failed": failed, "output": str(output) if output else None}
