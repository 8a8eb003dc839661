"""Varied test prompts, plain and chat, from a few to about 500 tokens."""

from __future__ import annotations

PARAGRAPHS = [
    "The river rose slowly through the night, and by morning the lower fields were under "
    "water. Farmers moved their animals to the hill pastures and waited, counting sandbags "
    "and listening to the radio for news of the dam upstream.",
    "A compiler translates a program written in one language into another, usually lower "
    "level, language. It checks types, allocates registers and schedules instructions, "
    "trading compile time for the speed of the code it produces.",
    "In the market square the baker sold bread, the fishmonger shouted prices, and children "
    "chased pigeons between the stalls while their parents argued about the cost of apples.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. Plants store "
    "the sugar as starch, and almost every food chain on land begins with this reaction.",
]

QUESTIONS = [
    "What is the capital of Italy?",
    "Explain recursion to a ten-year-old.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
    "How do vaccines train the immune system?",
    "Translate 'good morning' into Spanish and French.",
]

PLAIN = [
    "Once upon a time, in a village",
    "The quick brown fox jumps over",
    "def quicksort(arr):",
    "1, 2, 3, 5, 8, 13,",
    "Dear hiring manager, I am writing to apply for",
]


def make_prompts(tokenizer) -> list[dict]:
    """16+ prompts as {"kind": "plain"|"chat", "ids": [...]} spanning 5..500 tokens."""
    out = []
    for p in PLAIN:
        out.append({"kind": "plain", "ids": tokenizer(p).input_ids})
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        out.append({"kind": "chat", "ids": tokenizer(text, add_special_tokens=False).input_ids})
    for i, n_paragraphs in enumerate([2, 5, 7, 9, 11]):
        # Long documents: about 100 to 500 tokens of text, then a question or a continuation.
        doc = " ".join(PARAGRAPHS[(i + j) % len(PARAGRAPHS)] for j in range(n_paragraphs))
        if i % 2:
            msgs = [
                {"role": "system", "content": "You answer questions about the document."},
                {"role": "user", "content": doc + "\n\nSummarise the document in one sentence."},
            ]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.append({"kind": "chat", "ids": tokenizer(text, add_special_tokens=False).input_ids})
        else:
            out.append({"kind": "plain", "ids": tokenizer(doc).input_ids})
    return out
