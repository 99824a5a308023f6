"""Seeded generator of MovieLens-shaped data with a known structure, for the demo and tests.

The data has what makes recommendation non-trivial and checkable:

- power-law item popularity and skewed (log-normal) user activity;
- latent taste: users and items have factors, and a user's choices follow
  ``softmax(u . v / temperature + log popularity)``, so a collaborative model measurably beats
  popularity while popularity still beats random;
- ratings 1..5 that rise with affinity, timestamps spread over ``days`` from ``start``;
- item genres tied to the item's dominant factor, and user attributes.

Same arguments, same seed -> byte-identical frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import schema, settings

GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
]  # fmt: skip
OCCUPATIONS = ["student", "engineer", "educator", "artist", "writer", "other", "retired"]


def generate_sample(
    *,
    n_users: int,
    n_items: int,
    n_interactions: int,
    n_factors: int = 8,
    start: str = "2026-05-01",
    days: int = 200,
    seed: int = 0,
    temperature: float = 0.25,
    user_chunk: int = 4096,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return ``(interactions, items, users)``.

    interactions: ``user_id, item_id, rating, timestamp`` (ints; timestamp in unix seconds),
    sorted by timestamp; no (user, item) pair repeats. items: ``item_id, title, year, genres``.
    users: ``user_id, age, gender, occupation, zip_code``. Ids start at 1, as in MovieLens.
    """
    if min(n_users, n_items, n_interactions) <= 0:
        raise ValueError("n_users, n_items and n_interactions must be positive")
    rng = np.random.default_rng(seed)
    user_f = rng.normal(size=(n_users, n_factors)).astype(np.float32)
    item_f = rng.normal(size=(n_items, n_factors)).astype(np.float32)
    user_f /= np.linalg.norm(user_f, axis=1, keepdims=True)
    item_f /= np.linalg.norm(item_f, axis=1, keepdims=True)
    log_pop = -0.8 * np.log(rng.permutation(n_items) + 1.0).astype(np.float32)  # Zipf-like

    activity = rng.lognormal(mean=0.0, sigma=0.9, size=n_users)
    counts = np.maximum(3, np.round(activity / activity.sum() * n_interactions)).astype(np.int64)
    counts = np.minimum(counts, n_items // 2)

    users, items, affin = [], [], []
    for lo in range(0, n_users, user_chunk):
        hi = min(lo + user_chunk, n_users)
        aff = user_f[lo:hi] @ item_f.T
        logits = aff / temperature + log_pop
        gumbel = -np.log(-np.log(rng.random(size=logits.shape, dtype=np.float32) + 1e-12) + 1e-12)
        keys = logits + gumbel  # Gumbel top-k == sampling without replacement from softmax
        for row, u in enumerate(range(lo, hi)):
            c = int(counts[u])
            top = np.argpartition(-keys[row], c - 1)[:c]
            users.append(np.full(c, u))
            items.append(top)
            affin.append(aff[row, top])
    u = np.concatenate(users)
    i = np.concatenate(items)
    a = np.concatenate(affin)
    rating = np.clip(np.round(3.2 + 2.2 * a + rng.normal(scale=0.7, size=a.size)), 1, 5)

    t0 = pd.Timestamp(start, tz="UTC").timestamp()
    user_start = rng.uniform(0, 0.7, size=n_users) * days * 86400
    ts = t0 + user_start[u] + rng.uniform(0, 0.3, size=u.size) * days * 86400
    inter = pd.DataFrame(
        {
            schema.USER_ID: u + 1,
            schema.ITEM_ID: i + 1,
            schema.RATING: rating.astype(np.int64),
            schema.TIMESTAMP: ts.astype(np.int64),
        }
    )
    inter = inter.sort_values([schema.TIMESTAMP, schema.USER_ID, schema.ITEM_ID], kind="stable")

    dominant = np.argmax(item_f, axis=1)
    second = np.argsort(item_f, axis=1)[:, -2]
    items_df = pd.DataFrame(
        {
            schema.ITEM_ID: np.arange(1, n_items + 1),
            "title": [f"Item {k}" for k in range(1, n_items + 1)],
            "year": rng.integers(1950, 2026, size=n_items),
            "genres": [
                f"{GENRES[d % len(GENRES)]} {GENRES[(s + 7) % len(GENRES)]}"
                for d, s in zip(dominant, second)
            ],
        }
    )
    users_df = pd.DataFrame(
        {
            schema.USER_ID: np.arange(1, n_users + 1),
            "age": rng.integers(15, 75, size=n_users),
            "gender": rng.choice(["F", "M"], size=n_users),
            "occupation": rng.choice(OCCUPATIONS, size=n_users),
            "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, size=n_users)],
        }
    )
    return inter.reset_index(drop=True), items_df, users_df


def write_sample(out_dir: Path, **kwargs) -> dict[str, Path]:
    """Generate and write ``interactions.csv``, ``items.csv``, ``users.csv`` into ``out_dir``."""
    inter, items, users = generate_sample(**kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "interactions": out_dir / "interactions.csv",
        "items": out_dir / "items.csv",
        "users": out_dir / "users.csv",
    }
    inter.to_csv(paths["interactions"], index=False)
    items.to_csv(paths["items"], index=False)
    users.to_csv(paths["users"], index=False)
    return paths


def sample_kwargs(params: dict) -> dict:
    s = params["sample"]
    return {
        "n_users": s["n_users"],
        "n_items": s["n_items"],
        "n_interactions": s["n_interactions"],
        "n_factors": s["n_factors"],
        "start": s["start"],
        "days": s["days"],
        "seed": params["seed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write seeded sample data (sizes from params).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-interactions", type=int, help="override sample.n_interactions")
    args = parser.parse_args(argv)
    kwargs = sample_kwargs(settings.load_params())
    if args.n_interactions:
        kwargs["n_interactions"] = args.n_interactions
    for name, path in write_sample(args.out, **kwargs).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
