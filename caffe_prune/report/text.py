"""The lines every report shares: a mean with its interval, the data and the protocol used."""
from __future__ import annotations

def pm(mean, half, n=None) -> str:
    text = f"{mean:.1f} ± {half:.1f}"
    return text + (f" (n={n})" if n is not None else "")


def data_line(protocol: dict) -> str:
    """The data a run read, with its image counts ("5085 train / 1017 test images") unless its
    description already gives them."""
    data = str(protocol.get("data", "?"))
    counts = protocol.get("counts") or {}
    parts = [f"{counts[k]} {k}" for k in ("train", "test") if k in counts]
    return data if "images" in data or not parts else f"{data}, {' / '.join(parts)} images"


def stop_rule(c: dict) -> str:
    rule = ("no drop stop (whole curves)" if c.get("max_drop") is None
            else f"stop at a drop of more than {c['max_drop']} points")
    if c.get("floor") is not None:
        rule += f", or below {c['floor']}% top-1"
    if c.get("max_steps") is not None:
        rule += f", or after {c['max_steps']} steps"
    return rule


def protocol_lines(runs) -> list:
    if not runs:
        return []
    c, p = runs[0]["config"], runs[0].get("protocol") or {}
    seeds = sorted({r["seed"] for r in runs})
    return ["## Protocol used", "",
            f"- data: {data_line(p)}; "
            f"test measured on {p.get('test_images_per_measurement', '?')} images per step.",
            f"- batches of {c['batch_size']}, {c['eval_size']} per saliency computation; "
            f"test every {c['test_interval']} step(s); {stop_rule(c)}.",
            f"- masking semantics: {c['semantics']}; tensors read: {c['reading']}.",
            f"- runs: {len(runs)}; seeds: {', '.join(map(str, seeds))}.", ""]
