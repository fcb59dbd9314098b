"""Readers: every source becomes the three canonical tables.

- events: user_id, item_id, ts, event, request_id (optional), position (optional)
- items:  item_id, category, brand, title, first_seen_ts, optional attributes
- users:  user_id, optional profile columns

Events stay a Ray Dataset (they can be billions of rows); items and users are
catalogues and come back as pandas frames. Readers convert formats, they do not
judge rows: a bad row passes through to validation, which counts and keeps it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import FunnelConfig

EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "request_id", "position"]
ITEM_COLUMNS = ["item_id", "category", "brand", "title", "first_seen_ts"]


@dataclass
class RawTables:
    events: Any  # ray.data.Dataset of canonical events
    items: pd.DataFrame
    users: pd.DataFrame
    has_impressions: bool  # False: negatives are sampled (e.g. Taobao)
    source: str
    served_events: int = 0  # input rows that came from served-traffic logs (data.served_events)


def _ray_data():
    import ray.data

    return ray.data


def read_parquet_files(paths: list[str], num_blocks: int) -> Any:
    """Parquet files → a Ray Dataset of `num_blocks` read tasks.

    Ray 2.60's default Parquet reader (datasource v2) packs a small input into one block and
    ignores `override_num_blocks`; on 59 MiB of events that is one read task and one validation
    task for the whole input, and it also starts 32 FooterReader actors (processes) per listing.
    The v1 reader honours `override_num_blocks`, so the first passes run on every CPU
    (benchmarks/RESULTS.md, "Ingest")."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return _ray_data().read_parquet(paths, override_num_blocks=num_blocks)
    finally:
        ctx.use_datasource_v2 = v2


def _canonical_events(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in ("request_id", "position"):
        if c not in out:
            out[c] = -1
    return out[EVENT_COLUMNS]


def read_simulator(cfg: FunnelConfig) -> RawTables:
    from pipeline.simulator import generate_events_batch, num_blocks
    from pipeline.world import get_world

    rd = _ray_data()
    world = get_world(cfg.world)
    nb = num_blocks(cfg.world)
    events = rd.range(nb, override_num_blocks=nb).map_batches(
        generate_events_batch, batch_size=1, batch_format="numpy", fn_kwargs={"world_cfg": cfg.world}
    )
    return RawTables(events, world.items_table(), world.users_table(), True, "simulator")


# --------------------------------------------------------------------------- MovieLens


def movielens100k_frames(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """MovieLens-100k in recbole's atomic-file layout → canonical frames.

    Ratings >= 4 are clicks; the rest are exposed-but-unclicked impressions —
    one canonical event per rating row, so the 100,000 input rows are 100,000
    event rows. The first genre is the category, all genres are an attribute,
    the title is the item text; age, gender and occupation are the profile.
    """
    root = Path(root)
    inter_path = root / "ml-100k.inter"
    if not inter_path.exists():
        raise FileNotFoundError(
            f"{inter_path} not found: run `make movielens` (fetches MovieLens-100k from the recbole 1.2.1 wheel)"
        )
    inter = pd.read_csv(inter_path, sep="\t", dtype=str, keep_default_na=False)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    rating = pd.to_numeric(inter["rating"], errors="coerce")
    events = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "ts": inter["timestamp"],
            "event": np.where(rating >= 4, "click", np.where(rating.notna(), "impression", "unrated")),
        }
    )
    item = pd.read_csv(root / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    item.columns = [c.split(":")[0] for c in item.columns]
    genres = item["class"].fillna("")
    items = pd.DataFrame(
        {
            "item_id": item["item_id"],
            "category": genres.str.split(" ").str[0].replace("", "unknown"),
            "brand": "release_" + item["release_year"].replace("", "unknown"),
            "title": item["movie_title"],
            "genres": genres,
            "first_seen_ts": -1,
        }
    )
    user = pd.read_csv(root / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    user.columns = [c.split(":")[0] for c in user.columns]
    users = user[["user_id", "age", "gender", "occupation"]].copy()
    users["age"] = pd.cut(pd.to_numeric(users["age"], errors="coerce"), [0, 17, 24, 34, 44, 54, 200]).astype(str)
    return _canonical_events(events), _first_seen(items, events), users


def movielens1m_frames(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """MovieLens-1M `.dat` files (latin-1, `::`-separated) → canonical frames; same rules as 100k."""
    root = Path(root)
    kw: dict[str, Any] = {"sep": "::", "engine": "python", "encoding": "latin-1", "header": None, "dtype": str}
    ratings = pd.read_csv(root / "ratings.dat", names=["user_id", "item_id", "rating", "ts"], **kw)
    rating = pd.to_numeric(ratings["rating"], errors="coerce")
    events = ratings[["user_id", "item_id", "ts"]].copy()
    events["event"] = np.where(rating >= 4, "click", np.where(rating.notna(), "impression", "unrated"))
    movies = pd.read_csv(root / "movies.dat", names=["item_id", "title", "genres"], **kw)
    items = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "category": movies["genres"].str.split("|").str[0],
            "brand": movies["title"].str.extract(r"\((\d{4})\)\s*$")[0].fillna("unknown"),
            "title": movies["title"].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True),
            "genres": movies["genres"].str.replace("|", " "),
            "first_seen_ts": -1,
        }
    )
    users = pd.read_csv(root / "users.dat", names=["user_id", "gender", "age", "occupation", "zip"], **kw)
    return _canonical_events(events), _first_seen(items, events), users[["user_id", "age", "gender", "occupation"]]


def _first_seen(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Where a catalogue has no release time, an item is first seen at its first event."""
    ts = pd.to_numeric(events["ts"], errors="coerce")
    first = ts.groupby(events["item_id"]).min()
    out = items.copy()
    out["first_seen_ts"] = out["item_id"].map(first).fillna(-1).astype(np.int64)
    return out


def _from_frames(events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, source: str) -> RawTables:
    rd = _ray_data()
    has_imp = bool((events["event"].astype(str) == "impression").any())
    return RawTables(rd.from_pandas(events), items, users, has_imp, source)


# --------------------------------------------------------------------------- Taobao


_TAOBAO_KIND = {"pv": "click", "buy": "buy", "cart": "cart", "fav": "fav"}


def taobao_to_canonical(batch: pd.DataFrame) -> pd.DataFrame:
    """UserBehavior rows → canonical events; pv is the click, buy/cart/fav are kept as-is."""
    kind = batch["behavior_type"].astype(str).str.strip().str.lower()
    return pd.DataFrame(
        {
            "user_id": batch["user_id"],
            "item_id": batch["item_id"],
            "ts": batch["timestamp"],
            "event": kind.map(_TAOBAO_KIND).fillna(kind),
            "request_id": -1,
            "position": -1,
            "category_id": batch["category_id"],
        }
    )


def read_taobao(path: str | Path) -> RawTables:
    """Taobao UserBehavior.csv (no header: user_id,item_id,category_id,behavior_type,timestamp).

    There are no impressions, so ranking negatives are sampled. The item table
    is derived from the log: category from category_id, no brand, no title.
    """
    import pyarrow.csv as pacsv

    rd = _ray_data()
    names = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
    ds = rd.read_csv(
        str(path),
        read_options=pacsv.ReadOptions(column_names=names),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, __import__("pyarrow").string())),
    ).map_batches(taobao_to_canonical, batch_format="pandas")
    cats = ds.select_columns(["item_id", "category_id", "ts"]).to_pandas()
    ts = pd.to_numeric(cats["ts"], errors="coerce")
    grp = cats.assign(ts=ts).groupby("item_id", sort=False)
    items = pd.DataFrame(
        {
            "category": grp["category_id"].first(),
            "first_seen_ts": grp["ts"].min().fillna(-1).astype(np.int64),
        }
    ).reset_index()
    items["brand"] = "unknown"
    items["title"] = ""
    users = pd.DataFrame({"user_id": pd.unique(ds.select_columns(["user_id"]).to_pandas()["user_id"])})
    return RawTables(ds.drop_columns(["category_id"]), items, users, False, "taobao")


# --------------------------------------------------------------------------- generic


def _read_any(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet" or path.is_dir():
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _find(root: Path, stem: str) -> Path | None:
    for ext in (".parquet", ".csv"):
        if (root / f"{stem}{ext}").exists():
            return root / f"{stem}{ext}"
    return (root / stem) if (root / stem).is_dir() else None


def read_generic(root: str | Path, column_map: dict[str, str]) -> RawTables:
    """A folder with events.{parquet,csv} and optional items.* / users.* ; `column_map`
    maps canonical names to the input's column names (shared by the three files)."""
    root = Path(root)
    ev_path = _find(root, "events")
    inverse = {v: k for k, v in column_map.items()}
    if ev_path is None and any(root.glob(SEGMENT_GLOB)):  # a served-traffic event log alone
        ev_path, events = root / SEGMENT_GLOB, served_as_canonical(read_event_segments(root))
    elif ev_path is None:
        raise FileNotFoundError(f"{root}: expected events.parquet, events.csv or event-log segments {SEGMENT_GLOB}")
    else:
        events = _read_any(ev_path).rename(columns=inverse)
    missing = [c for c in ("user_id", "item_id", "ts", "event") if c not in events]
    if missing:
        raise ValueError(
            f"{ev_path}: missing canonical column(s) {missing}; map them with data.column_map "
            f"(input columns: {list(events.columns)})"
        )
    it_path, us_path = _find(root, "items"), _find(root, "users")
    if it_path is not None:
        items = _read_any(it_path).rename(columns=inverse)
        for c, default in (("category", "unknown"), ("brand", "unknown"), ("title", "")):
            if c not in items:
                items[c] = default
        if "first_seen_ts" not in items:
            items = _first_seen(items.assign(first_seen_ts=-1), events)
    else:
        items = _first_seen(
            pd.DataFrame({"item_id": pd.unique(events["item_id"]), "category": "unknown", "brand": "unknown", "title": ""}),
            events,
        )
    users = _read_any(us_path).rename(columns=inverse) if us_path else pd.DataFrame({"user_id": pd.unique(events["user_id"])})
    # One dtype per id across the three tables, so joins cannot silently miss.
    for df in (events, items, users):
        for c in ("user_id", "item_id"):
            if c in df:
                df[c] = df[c].astype(str)
    return _from_frames(_canonical_events(events), items, users, "parquet")


# --------------------------------------------------------------------------- served traffic

SEGMENT_GLOB = "events-*.parquet"  # serving.router.EventLog's segments


def read_event_segments(folder: str | Path, missing_ok: bool = False) -> pd.DataFrame:
    """Every segment of a served-traffic event log, in time order, with all its columns
    (the canonical ones plus `arm` and `model_versions`); an empty frame for an empty folder."""
    parts = sorted(Path(folder).glob(SEGMENT_GLOB))
    if not parts:
        if not Path(folder).is_dir() and not missing_ok:
            raise FileNotFoundError(f"{folder}: no such event-log folder")
        return pd.DataFrame(columns=[*EVENT_COLUMNS, "arm", "model_versions"])
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def served_as_canonical(ev: pd.DataFrame) -> pd.DataFrame:
    """Served rows → canonical events. The log's request ids are opaque strings (uuid hex); the
    canonical request id is an int64, so each becomes a stable 62-bit hash (the same id, the same
    number, in every run). Ids stay text; validation normalises them as for every source."""
    out = pd.DataFrame({
        "user_id": ev["user_id"].astype(str).to_numpy(dtype=object),
        "item_id": ev["item_id"].astype(str).to_numpy(dtype=object),
        "ts": ev["ts"],
        "event": ev["event"].astype(str).to_numpy(dtype=object),
        "request_id": (pd.util.hash_pandas_object(ev["request_id"].astype(str), index=False).to_numpy()
                       & np.uint64(2**62 - 1)).astype(np.int64),
        "position": pd.to_numeric(ev["position"], errors="coerce").fillna(-1).astype(np.int64),
    })
    return out[EVENT_COLUMNS]


def _ids_as_text(batch: pd.DataFrame) -> pd.DataFrame:
    out = batch.copy()
    for c in ("user_id", "item_id"):
        out[c] = out[c].astype(str).to_numpy(dtype=object)
    return out


def with_served_events(raw: RawTables, folders: list[str]) -> RawTables:
    """The source's events followed by the served events of `folders` (one Ray Dataset); ids as
    text on both sides so the two schemas agree. `input_counts["served_events"]` says how many
    input rows came from the logs: they are counted, accepted or rejected like any other."""
    served = pd.concat([served_as_canonical(read_event_segments(f)) for f in folders], ignore_index=True)
    events = raw.events.map_batches(_ids_as_text, batch_format="pandas")
    if len(served):
        events = events.union(_ray_data().from_pandas(served))
    return dataclasses.replace(raw, events=events, served_events=len(served))


def _read_source(cfg: FunnelConfig) -> RawTables:
    src, path = cfg.data.source, cfg.data.input
    if src == "simulator":
        return read_simulator(cfg)
    if src == "movielens":
        return _from_frames(*movielens100k_frames(path or "data/raw/ml-100k"), source="movielens")
    if not path:
        raise ValueError(f"data.source={src} needs --input PATH")
    if src == "movielens1m":
        return _from_frames(*movielens1m_frames(path), source="movielens1m")
    if src == "taobao":
        raw = read_taobao(path)
    else:
        raw = read_generic(path, cfg.data.column_map)
    return raw


def read_source(cfg: FunnelConfig) -> RawTables:
    """The configured source's tables, plus the served-traffic logs of `data.served_events`."""
    raw = _read_source(cfg)
    return with_served_events(raw, cfg.data.served_events) if cfg.data.served_events else raw
