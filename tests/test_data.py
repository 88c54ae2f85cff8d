"""Dataset layer: the preference-log format and the PRISM, TL;DR and MovieLens loaders.

Expected values are recomputed here from the raw fixture files and from the protocol's
definitions (SPEC §6), not taken from the loaders' own output.
"""

import hashlib
import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from mrm.data import (
    PreferenceData,
    conversation_prompt,
    load_movielens,
    load_prism,
    load_tldr,
    prompt_messages,
    read_preference_log,
    with_shots,
    write_preference_log,
)

FIXTURES = Path(__file__).parent / "fixtures"


def expected_seen(user_ids, seed=42):
    order = sorted(user_ids)
    random.Random(seed).shuffle(order)
    return {u: i < len(order) // 2 for i, u in enumerate(order)}


def official_rng(seed, user):
    return random.Random(seed + int(hashlib.md5(user.encode()).hexdigest(), 16) % (2**32))


def pair_texts(data: PreferenceData, split: str, u: int):
    """(prompt, chosen, rejected, group) of user ``u``'s pairs, in order."""
    pairs = getattr(data, split)
    out = []
    for p in range(pairs.offsets[u], pairs.offsets[u + 1]):
        prompt, chosen = data.texts[pairs.chosen[p]]
        prompt_r, rejected = data.texts[pairs.rejected[p]]
        assert prompt == prompt_r
        out.append((prompt, chosen, rejected, int(pairs.groups[p])))
    return out


def check_seen(data: PreferenceData):
    expected = expected_seen(data.user_ids)
    assert [bool(s) for s in data.seen] == [expected[u] for u in data.user_ids]
    assert int(data.seen.sum()) == data.n_users // 2


# ----------------------------------------------------------------------------- preference logs


def log_rows():
    rows = []
    for user, n in (("ann", 6), ("ben", 5), ("cat", 4), ("dan", 7)):
        for i in range(n):
            rows.append(
                {
                    "user_id": user,
                    "prompt": f"Question {i} from {user}?",
                    "chosen": f"Good answer {i} for {user}.",
                    "rejected": f"Weak answer {i} for {user}.",
                    "split": "train" if i % 3 else "test",
                    "group_id": f"{user}-conv{i // 2}",
                }
            )
    return rows


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_log_round_trip_keeps_every_pair_and_split(tmp_path, suffix):
    rows = log_rows()
    path = tmp_path / f"log{suffix}"
    write_preference_log(path, rows)
    data = read_preference_log(path)
    assert data.user_ids == ["ann", "ben", "cat", "dan"]
    check_seen(data)
    assert data.skipped["duplicate_pairs"] == 0
    for u, user in enumerate(data.user_ids):
        for split in ("train", "test"):
            got = {t[:3] for t in pair_texts(data, split, u)}
            want = {(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r["user_id"] == user and r["split"] == split}
            assert got == want
        # pairs of one group_id share one group id; different group_ids differ
        by_group = defaultdict(set)
        for split in ("train", "test"):
            for prompt, _, _, group in pair_texts(data, split, u):
                i = int(prompt.split()[1])
                by_group[group].add(f"{user}-conv{i // 2}")
        assert all(len(names) == 1 for names in by_group.values())
        assert len({next(iter(v)) for v in by_group.values()}) == len(by_group)
    assert not list(tmp_path.glob(".*tmp"))


def test_log_without_split_uses_a_seeded_per_user_group_split(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in log_rows()]
    path = tmp_path / "log.jsonl"
    write_preference_log(path, rows)
    data = read_preference_log(path, test_fraction=0.5)
    for u, user in enumerate(data.user_ids):
        user_rows = [r for r in rows if r["user_id"] == user]
        groups = list(dict.fromkeys(r["group_id"] for r in user_rows))
        official_rng(42, user).shuffle(groups)
        train_groups = set(groups[: len(groups) // 2])
        want_train = {(r["prompt"], r["chosen"], r["rejected"]) for r in user_rows if r["group_id"] in train_groups}
        got_train = {t[:3] for t in pair_texts(data, "train", u)}
        got_test = {t[:3] for t in pair_texts(data, "test", u)}
        assert got_train == want_train
        assert got_train.isdisjoint(got_test) and len(got_train) + len(got_test) == len(user_rows)
    # a user's split does not depend on the other users in the file
    write_preference_log(path, [r for r in rows if r["user_id"] in ("ann", "dan")])
    fewer = read_preference_log(path, test_fraction=0.5)
    assert pair_texts(fewer, "train", 0) != [] and {t[:3] for t in pair_texts(fewer, "train", 0)} == {
        t[:3] for t in pair_texts(data, "train", 0)
    }


def test_log_skips_duplicates_and_small_users_with_counts(tmp_path):
    rows = log_rows()
    rows.append(dict(rows[0]))
    rows.append(dict(rows[1], split="test"))  # the same pair again, on the other side
    rows.append({"user_id": "eve", "prompt": "Only one?", "chosen": "Yes.", "rejected": "No.", "split": "train", "group_id": "e"})
    path = tmp_path / "log.parquet"
    write_preference_log(path, rows)
    data = read_preference_log(path, min_pairs=2)
    assert data.skipped == {"same_text_pairs": 0, "duplicate_pairs": 2, "users_below_min_pairs": 1, "pairs_of_users_below_min_pairs": 1}
    assert "eve" not in data.user_ids
    assert data.train.n_pairs + data.test.n_pairs == len(log_rows())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "record, message",
    [
        ({"user_id": "a", "prompt": "p"}, "row 1 lacks column(s) chosen, rejected"),
        ({"user_id": "a", "prompt": "p", "chosen": 3, "rejected": "r"}, "column 'chosen', row 1: expected a string"),
        ({"user_id": "a", "prompt": " ", "chosen": "c", "rejected": "r"}, "column 'prompt', row 1: empty text"),
        ({"user_id": "a", "prompt": "p", "chosen": "c", "rejected": "r", "split": "val"}, "column 'split', row 1: 'val'"),
    ],
)
def test_log_validation_names_file_column_and_row(tmp_path, record, message):
    good = {"user_id": "a", "prompt": "p0", "chosen": "c0", "rejected": "r0"}
    if "split" in record:
        good["split"] = "train"
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(ValueError) as err:
        read_preference_log(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_log_same_text_pairs_are_skipped_and_counted(tmp_path):
    rows = [{"user_id": u, "prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for u in "ab" for i in range(3)]
    rows.insert(2, {"user_id": "a", "prompt": "p", "chosen": "same", "rejected": "same"})
    rows.append({"user_id": "b", "prompt": "q", "chosen": "x", "rejected": "x"})
    data = read_preference_log(write_jsonl(tmp_path / "same.jsonl", rows))
    assert data.skipped["same_text_pairs"] == 2
    assert data.train.n_pairs + data.test.n_pairs == 6
    texts = {response for _, response in data.texts}
    assert "same" not in texts and "x" not in texts


def test_log_missing_columns_are_listed(tmp_path):
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"cols{suffix}"
        if suffix == ".jsonl":
            write_jsonl(path, [{"user": "a", "prompt": "p", "rejected": "r"}])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"user": ["a"], "prompt": ["p"], "rejected": ["r"]}), path)
        with pytest.raises(ValueError, match=r"missing column\(s\) user_id, chosen"):
            read_preference_log(path)


def test_log_corrupt_files_give_clear_errors(tmp_path):
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(ValueError, match="not a readable Parquet preference log"):
        read_preference_log(parquet)
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"user_id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n{"user_id": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_preference_log(jsonl)
    with pytest.raises(FileNotFoundError):
        read_preference_log(tmp_path / "absent.jsonl")


def test_log_write_is_atomic_and_validated(tmp_path):
    path = tmp_path / "log.parquet"
    write_preference_log(path, log_rows())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'chosen' equals 'rejected'"):
        write_preference_log(path, log_rows() + [{"user_id": "x", "prompt": "p", "chosen": "c", "rejected": "c"}])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]


def test_dataset_written_as_log_reads_back_identically(tmp_path):
    data = load_prism(FIXTURES / "prism")
    path = tmp_path / "prism.parquet"
    write_preference_log(path, data)
    again = read_preference_log(path, min_pairs=1)
    assert again.user_ids == data.user_ids and list(again.seen) == list(data.seen)
    for u in range(data.n_users):
        for split in ("train", "test"):
            assert [t[:3] for t in pair_texts(again, split, u)] == [t[:3] for t in pair_texts(data, split, u)]


def test_conversation_prompt_round_trip():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert prompt_messages(conversation_prompt(history)) == history
    assert conversation_prompt(history[:1]) == "Hi"
    assert prompt_messages("[not json") == [{"role": "user", "content": "[not json"}]


# ----------------------------------------------------------------------------- PRISM


def prism_fixture():
    """Per user: conversation id -> list of turns (user text, {response: (score, chosen)})."""
    survey = [json.loads(line) for line in (FIXTURES / "prism" / "survey.jsonl").read_text().splitlines()]
    active = {s["user_id"] for s in survey if s["num_completed_conversations"] > 0}
    users = defaultdict(dict)
    for line in (FIXTURES / "prism" / "conversations.jsonl").read_text().splitlines():
        c = json.loads(line)
        turns = defaultdict(lambda: {"user": None, "responses": {}})
        for u in c["conversation_history"]:
            if u["role"] == "user":
                turns[u["turn"]]["user"] = u["content"]
            else:
                turns[u["turn"]]["responses"][u["content"]] = (u["score"], u["if_chosen"])
        qualified = [turns[t] for t in sorted(turns) if len(turns[t]["responses"]) >= 2]
        if c["user_id"] in active and qualified:
            users[c["user_id"]][c["conversation_id"]] = qualified
    return {u: convs for u, convs in users.items() if len(convs) >= 6}


def test_prism_users_seen_split_and_skips():
    data = load_prism(FIXTURES / "prism")
    fixture = prism_fixture()
    assert data.user_ids == sorted(fixture) == ["user-ada", "user-bo", "user-cy", "user-dee"]
    check_seen(data)
    assert data.skipped["users_below_min_dialogues"] == 1  # user-eli, 3 conversations
    assert data.skipped["users_without_conversations"] == 1  # user-fay
    assert data.skipped["conversations_without_survey"] == 1
    assert data.skipped["conversations_without_pairs"] == 1  # user-cy's conversation without responses


def test_prism_pairs_prompts_and_per_user_conversation_split():
    data = load_prism(FIXTURES / "prism")
    fixture = prism_fixture()
    for u, user in enumerate(data.user_ids):
        conversations = list(fixture[user])
        official_rng(42, user).shuffle(conversations)
        want = {"train": conversations[: len(conversations) // 2], "test": conversations[len(conversations) // 2 :]}
        groups_of = {}
        for split in ("train", "test"):
            pairs = pair_texts(data, split, u)
            expected = []
            for cid in want[split]:
                history = []
                for turn in fixture[user][cid]:
                    chosen = next(text for text, (_, is_chosen) in turn["responses"].items() if is_chosen)
                    prompt = conversation_prompt(history + [{"role": "user", "content": turn["user"]}])
                    for text, (score, is_chosen) in turn["responses"].items():
                        if not is_chosen:
                            assert turn["responses"][chosen][0] > score  # chosen is the best rated
                            expected.append((prompt, chosen, text, cid))
                    history += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": chosen}]
            assert [p[:3] for p in pairs] == [e[:3] for e in expected]
            # one group per conversation
            for (_, _, _, group), (_, _, _, cid) in zip(pairs, expected):
                assert groups_of.setdefault(group, cid) == cid
        assert len(set(groups_of.values())) == len(groups_of) == len(conversations)
    # a second turn's prompt carries the first turn's exchange
    multi = [prompt_messages(p) for p, _ in data.texts if len(prompt_messages(p)) > 1]
    assert multi and all([m["role"] for m in msgs] == ["user", "assistant", "user"] for msgs in multi)


# ----------------------------------------------------------------------------- Reddit TL;DR


def tldr_records():
    records = []
    for path in (FIXTURES / "tldr" / "comparisons").glob("*.json"):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def test_tldr_users_orientation_and_train_caps():
    data = load_tldr(FIXTURES / "tldr", seen_train_pairs=3, unseen_train_pairs=2)
    records = [r for r in tldr_records() if r["info"].get("post")]
    train_workers = {r["worker"] for r in records if r["split"] == "train"}
    valid_workers = {r["worker"] for r in records if r["split"].startswith("valid")}
    assert data.user_ids == sorted(train_workers & valid_workers)
    assert "worker-solo" not in data.user_ids
    check_seen(data)
    assert data.skipped["records_without_post"] == 1
    for u, user in enumerate(data.user_ids):
        def oriented(split_test):
            return {
                (r["info"]["post"], r["summaries"][r["choice"]]["text"], r["summaries"][1 - r["choice"]]["text"])
                for r in records
                if r["worker"] == user and split_test(r["split"])
            }
        all_train = oriented(lambda s: s == "train")
        train = [t[:3] for t in pair_texts(data, "train", u)]
        assert len(train) == min(len(all_train), 3 if data.seen[u] else 2)
        assert set(train) <= all_train
        assert set(t[:3] for t in pair_texts(data, "test", u)) == oriented(lambda s: s.startswith("valid"))
        assert len({t[3] for t in pair_texts(data, "train", u) + pair_texts(data, "test", u)}) == len(train) + data.test.counts()[u]


def test_tldr_uncapped_and_with_title():
    data = load_tldr(FIXTURES / "tldr", seen_train_pairs=None, unseen_train_pairs=None, with_title=True)
    records = [r for r in tldr_records() if r["info"].get("post") and r["worker"] in data.user_ids]
    assert data.train.n_pairs == sum(r["split"] == "train" for r in records)
    assert all(p.startswith("TITLE: ") and "\n\nPOST: " in p for p, _ in data.texts)


# ----------------------------------------------------------------------------- MovieLens


def read_ratings(directory: Path, stem: str):
    """user -> item text -> ratings, straight from the atomic files."""
    items = {}
    lines = (directory / f"{stem}.item").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        item, title, year, genres = line.split("\t")
        items[item] = f"{title} ({year}). Genres: {', '.join(genres.split())}"
    ratings = defaultdict(lambda: defaultdict(list))
    for line in (directory / f"{stem}.inter").read_text().splitlines()[1:]:
        user, item, rating, _ = line.split("\t")
        ratings[user][items[item]].append(float(rating))
    return ratings


def check_movielens(data, ratings, min_gap, max_train, max_test):
    check_seen(data)
    for u, user in enumerate(data.user_ids):
        sides = {}
        for split, cap in (("train", max_train), ("test", max_test)):
            pairs = pair_texts(data, split, u)
            assert 0 < len(pairs) <= cap
            for _, chosen, rejected, _ in pairs:
                assert any(c - r >= min_gap for c in ratings[user][chosen] for r in ratings[user][rejected])
            sides[split] = {t for p in pairs for t in p[1:3]}
        assert sides["train"].isdisjoint(sides["test"]), f"user {user}: an item is on both sides"


def test_movielens_synthetic_atomic_files():
    directory = FIXTURES / "movielens_synth"
    data = load_movielens(directory=directory, test_item_fraction=0.4, min_gap=2, max_train_pairs=10, max_test_pairs=3, name="synth")
    ratings = read_ratings(directory, "movielens_synth")
    assert "14" not in data.user_ids  # equal ratings only: no pair
    assert data.skipped["users_without_train_or_test_pairs"] >= 1
    check_movielens(data, ratings, 2, 10, 3)
    # the two listings of "Twice Told (1990)" are one text row
    assert sum("Twice Told" in response for _, response in data.texts) <= 1


def test_with_shots_keeps_a_prefix_of_the_chosen_users():
    data = load_movielens(directory=FIXTURES / "movielens_synth", test_item_fraction=0.4, name="synth")
    few = with_shots(data, 2, users="unseen")
    counts, few_counts = data.train.counts(), few.train.counts()
    for u in range(data.n_users):
        n = min(counts[u], 2) if not data.seen[u] else counts[u]
        assert few_counts[u] == n
        assert pair_texts(few, "train", u) == pair_texts(data, "train", u)[:n]
        assert pair_texts(few, "test", u) == pair_texts(data, "test", u)
    assert list(with_shots(data, 0, users="all").train.counts()) == [0] * data.n_users
    with pytest.raises(ValueError):
        with_shots(data, 2, users="some")


def test_movielens_missing_recbole_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_movielens()


@pytest.fixture(scope="module")
def movielens():
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole (which ships MovieLens-100K) is not installed")
    return load_movielens()


def test_movielens_real_split_is_item_disjoint_and_ordered_by_rating(movielens):
    spec = importlib.util.find_spec("recbole")
    directory = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    ratings = read_ratings(directory, "ml-100k")
    data = movielens
    assert data.n_users > 900 and set(data.user_ids) <= set(ratings)
    check_movielens(data, ratings, 1, 150, 50)
