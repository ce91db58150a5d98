"""The shipped data cards of Hub datasets, read from fixtures in their real shapes instead of the Hub."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_pipeline.data.cards import DataCard, SourceSpec, load_card
from rlhf_pipeline.data.formats import Converted
from rlhf_pipeline.data.loading import convert_card_rows, read_card_rows

REPO = Path(__file__).resolve().parents[2]


def shipped_card_on_fixture(card_name: str, fixture: Path) -> DataCard:
    """The shipped card as it is (format, columns, options, polarity), reading `fixture` instead of the Hub."""
    card = load_card(REPO / "data_cards" / f"{card_name}.yaml")
    return dataclasses.replace(card, source=SourceSpec(path=str(fixture)))


def convert(card: DataCard) -> Converted:
    """The card's rows as the loader converts them (every line readable)."""
    rows, unreadable, _ = read_card_rows(card)
    assert not unreadable
    return convert_card_rows(card, rows, system_prompt=None)
