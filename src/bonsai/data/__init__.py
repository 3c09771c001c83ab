"""Training datasets: the bonsai-emoji bundle (Noto Emoji + Twemoji, captions, text states)."""

from .emoji import ATTRIBUTION, EmojiRecord, build_caption, emoji_records, split_for
from .store import EmojiDataset, load_emoji_dataset

__all__ = ["ATTRIBUTION", "EmojiDataset", "EmojiRecord", "build_caption", "emoji_records", "load_emoji_dataset", "split_for"]
