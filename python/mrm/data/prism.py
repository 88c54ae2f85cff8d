"""PRISM (Kirk et al. 2024, ``HannahRoseKirk/prism-alignment``) as the MRM paper builds it.

Input: a local directory holding the dataset's official ``survey.jsonl`` and
``conversations.jsonl`` (``utterances.jsonl`` may be there too; it repeats what the conversations
hold and is not read). Fields used:

- survey: ``user_id``, ``num_completed_conversations``;
- conversations: ``conversation_id``, ``user_id``, ``conversation_history`` — a list of
  utterances with ``turn`` (0-based), ``role`` (``"user"`` or ``"model"``), ``content``,
  ``if_chosen`` and ``score``.

Construction (the released MRM preprocessing and its dataset builder):

1. Participants with no completed conversation are dropped.
2. Each conversation's utterances are grouped by turn. A turn *qualifies* when it has a user
   message, a chosen response (``if_chosen``) and at least one other response. Conversations with
   no qualifying turn are dropped, then users with fewer than ``min_dialogues`` (6) conversations.
3. Every qualifying turn gives one pair per non-chosen response: chosen = the response the
   participant chose (the highest rated), rejected = each of the others. The prompt is the
   conversation so far — the earlier qualifying turns' user messages and chosen responses, then
   this turn's user message — stored as a chat-message list (:func:`conversation_prompt`).
4. Users are split seen/unseen by SPEC §6 (sorted ids, ``random.Random(seed)``, first half seen).
5. Each user's conversations (in file order) are shuffled with the user's RNG
   (``Random(seed + md5(user_id) mod 2**32)``, :func:`user_rng`); the first ``n // 2`` are
   training, the rest test. One group per conversation, so support/query splits keep a
   conversation whole. ``seed`` is 42 in the released scripts.

Deviations from the released code (documented choices):

- The official code keeps every rejected response regardless of its score (its score filter is
  disabled in the released scripts); so does this loader. ``min_score_gap`` (default ``None``)
  optionally drops pairs whose chosen score does not exceed the rejected score by that much.
- Conversations whose ``user_id`` is missing from the survey are skipped and counted
  (``conversations_without_survey``) instead of failing. Turns without a qualifying set of
  utterances are skipped and counted (``unqualified_turns``); they do not enter the history.
- Several chosen responses in one turn: the first is used (as the official code).
- Users left with no training or no test conversation would be dropped (``users_without_split``);
  with ``min_dialogues >= 2`` this never happens. Users are listed in sorted id order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from mrm.data.logs import read_json_lines
from mrm.data.pairs import PreferenceData, build_preference_data, conversation_prompt, split_seen_users, user_rng

PathLike = Union[str, os.PathLike]


def _read_jsonl(path: Path) -> List[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"PRISM file {path} is missing (expected the official {path.name})")
    return read_json_lines(path)


def _field(record: dict, name: str, path: Path, line: int):
    if name not in record:
        raise ValueError(f"{path}: record {line} has no field {name!r}")
    return record[name]


def _turn_pairs(conversation: dict, path: Path, line: int, min_score_gap: Optional[float], counts: Dict[str, int]):
    """(prompt, chosen, rejected) of each qualifying turn of one conversation, in turn order."""
    turns: Dict[int, dict] = {}
    for utterance in _field(conversation, "conversation_history", path, line) or []:
        turn = turns.setdefault(int(utterance["turn"]), {"user": [], "chosen": [], "rejected": []})
        if utterance["role"] == "user":
            turn["user"].append(utterance["content"])
        elif utterance.get("if_chosen"):
            turn["chosen"].append((utterance["content"], utterance.get("score")))
        else:
            turn["rejected"].append((utterance["content"], utterance.get("score")))

    history: List[Dict[str, str]] = []
    pairs = []
    for index in sorted(turns):
        turn = turns[index]
        if not (turn["user"] and turn["chosen"] and turn["rejected"]):
            counts["unqualified_turns"] += 1
            continue
        user_message = turn["user"][0]
        chosen, chosen_score = turn["chosen"][0]
        prompt = conversation_prompt(history + [{"role": "user", "content": user_message}])
        for rejected, rejected_score in turn["rejected"]:
            if min_score_gap is not None and (
                chosen_score is None or rejected_score is None or chosen_score - rejected_score < min_score_gap
            ):
                counts["pairs_below_min_score_gap"] += 1
                continue
            if rejected == chosen:
                counts["pairs_with_identical_responses"] += 1
                continue
            pairs.append((prompt, chosen, rejected))
        history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": chosen}]
    return pairs


def load_prism(
    directory: PathLike,
    *,
    seed: int = 42,
    min_dialogues: int = 6,
    min_score_gap: Optional[float] = None,
    name: str = "prism",
) -> PreferenceData:
    """Load PRISM from the official JSONL files in ``directory`` (see the module doc)."""
    directory = Path(directory)
    survey_path = directory / "survey.jsonl"
    conversations_path = directory / "conversations.jsonl"
    counts = {
        "users_without_conversations": 0,
        "conversations_without_survey": 0,
        "unqualified_turns": 0,
        "pairs_below_min_score_gap": 0,
        "pairs_with_identical_responses": 0,
        "conversations_without_pairs": 0,
        "users_below_min_dialogues": 0,
        "users_without_split": 0,
    }

    participants = set()
    for line, record in enumerate(_read_jsonl(survey_path), start=1):
        user = str(_field(record, "user_id", survey_path, line))
        if (record.get("num_completed_conversations") or 0) == 0:
            counts["users_without_conversations"] += 1
            continue
        participants.add(user)

    # user -> conversation id -> pairs, both in file order
    dialogues: Dict[str, Dict[str, list]] = {}
    for line, record in enumerate(_read_jsonl(conversations_path), start=1):
        user = str(_field(record, "user_id", conversations_path, line))
        conversation_id = str(_field(record, "conversation_id", conversations_path, line))
        if user not in participants:
            counts["conversations_without_survey"] += 1
            continue
        try:
            pairs = _turn_pairs(record, conversations_path, line, min_score_gap, counts)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{conversations_path}: record {line} (conversation {conversation_id}): bad utterance ({err!r})") from None
        if not pairs:
            counts["conversations_without_pairs"] += 1
            continue
        dialogues.setdefault(user, {})[conversation_id] = pairs

    for user in [u for u, convs in dialogues.items() if len(convs) < min_dialogues]:
        counts["users_below_min_dialogues"] += 1
        del dialogues[user]

    user_ids = sorted(dialogues)
    seen = split_seen_users(user_ids, seed)
    kept_ids, kept_seen, train, test = [], [], [], []
    for user, is_seen in zip(user_ids, seen):
        conversation_ids = list(dialogues[user])
        user_rng(seed, user).shuffle(conversation_ids)
        half = len(conversation_ids) // 2
        if half == 0 or half == len(conversation_ids):
            counts["users_without_split"] += 1
            continue
        kept_ids.append(user)
        kept_seen.append(is_seen)
        train.append([p + (cid,) for cid in conversation_ids[:half] for p in dialogues[user][cid]])
        test.append([p + (cid,) for cid in conversation_ids[half:] for p in dialogues[user][cid]])
    return build_preference_data(kept_ids, train, test, kept_seen, name, counts)
