"""Model cards for Hub-ready strata folders."""

from strata.hub_cards.model_card import ARCHITECTURE_CARDS, ArchitectureCard, render_model_card, set_card_model_id

__all__ = ["ARCHITECTURE_CARDS", "ArchitectureCard", "render_model_card", "set_card_model_id"]
