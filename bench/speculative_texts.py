"""The prompts of bench/speculative.py: public-domain passages to summarise, quote and edit, and open-ended questions.

Passages (all in the public domain; ASCII quotes and dashes, line breaks between paragraphs as in the sources):

- GETTYSBURG: Abraham Lincoln, the Gettysburg Address (19 November 1863), the Bliss copy, as the Library of Congress
  and Cornell University's exhibition give it.
- ALICE: Lewis Carroll, Alice's Adventures in Wonderland (1865), the first three paragraphs of Chapter I, "Down the
  Rabbit-Hole" (Project Gutenberg eBook #11).
- CONSTITUTION: the Constitution of the United States (1787): the Preamble, Article I Sections 1 and the first clause
  of Section 2 (National Archives transcription).
- PRIDE: Jane Austen, Pride and Prejudice (1813), the opening of Chapter 1 (Project Gutenberg eBook #1342).

The grounded tasks (`grounded_prompts`): per passage, a summary, a quotation of its first sentences, and an edit
(the passage with deterministic spelling mistakes, `misspell`, to be corrected). Output that copies the input is
what n-gram speculation (prompt lookup) can propose; open questions (`CHAT`) have no text to copy from.
"""

from __future__ import annotations

from dataclasses import dataclass

GETTYSBURG = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, and \
dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, \
can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, as \
a final resting place for those who here gave their lives that that nation might live. It is altogether fitting and \
proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The world \
will little note, nor long remember what we say here, but it can never forget what they did here. It is for us the \
living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so nobly \
advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these honored \
dead we take increased devotion to that cause for which they gave the last full measure of devotion -- that we here \
highly resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new birth of \
freedom -- and that government of the people, by the people, for the people, shall not perish from the earth."""

ALICE = """\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: once or \
twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it, "and what \
is the use of a book," thought Alice "without pictures or conversations?"

So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), \
whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the daisies, when \
suddenly a White Rabbit with pink eyes ran close by her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the way to hear the Rabbit \
say to itself, "Oh dear! Oh dear! I shall be late!" (when she thought it over afterwards, it occurred to her that she \
ought to have wondered at this, but at the time it all seemed quite natural); but when the Rabbit actually took a \
watch out of its waistcoat-pocket, and looked at it, and then hurried on, Alice started to her feet, for it flashed \
across her mind that she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of \
it, and burning with curiosity, she ran across the field after it, and fortunately was just in time to see it pop \
down a large rabbit-hole under the hedge."""

CONSTITUTION = """\
We the People of the United States, in Order to form a more perfect Union, establish Justice, insure domestic \
Tranquility, provide for the common defence, promote the general Welfare, and secure the Blessings of Liberty to \
ourselves and our Posterity, do ordain and establish this Constitution for the United States of America.

Article. I. Section. 1. All legislative Powers herein granted shall be vested in a Congress of the United States, \
which shall consist of a Senate and House of Representatives.

Section. 2. The House of Representatives shall be composed of Members chosen every second Year by the People of the \
several States, and the Electors in each State shall have the Qualifications requisite for Electors of the most \
numerous Branch of the State Legislature."""

PRIDE = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is \
so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or \
other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough."""

PASSAGES: dict[str, str] = {"gettysburg": GETTYSBURG, "alice": ALICE, "constitution": CONSTITUTION, "pride": PRIDE}

CHAT: tuple[str, ...] = (
    "What are some good ways to stay focused while studying?",
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What should I pack for a weekend camping trip?",
    "Why do cats purr?",
    "Give me three ideas for a child's birthday party.",
    "How does a bicycle stay upright when it moves?",
    "What is the difference between weather and climate?",
    "How can I make my mornings less stressful?",
    "Tell me a short story about a lost umbrella.",
    "What are the benefits of learning a second language?",
    "How do plants know which way is up?",
)

MISSPELL_EVERY = 6  # every 6th word of 5 letters or more loses a letter


def misspell(text: str, every: int = MISSPELL_EVERY) -> str:
    """text with every `every`-th word of five or more letters misspelt (its second-to-last letter dropped), the
    rest (spaces, punctuation, line breaks) unchanged: deterministic, so the edit prompts never change."""
    out, n = [], 0
    for line in text.split("\n"):
        words = []
        for word in line.split(" "):
            letters = sum(c.isalpha() for c in word)
            if letters >= 5:
                n += 1
                if n % every == 0:
                    i = max(j for j, c in enumerate(word) if c.isalpha()) - 1  # the second-to-last letter
                    word = word[:i] + word[i + 1 :]
            words.append(word)
        out.append(" ".join(words))
    return "\n".join(out)


@dataclass(frozen=True)
class Task:
    name: str  # "<passage> <kind>" or "chat <i>"
    kind: str  # summary, quote, edit (grounded) or chat
    text: str  # the user's message


QUOTE = "Quote the first two sentences of the text above exactly, word for word."
EDIT = "Correct the spelling mistakes in the following text. Reply with the corrected text only."


def grounded_prompts() -> list[Task]:
    """Per passage: summarise it, quote its opening, correct its (misspelt) text; passage by passage."""
    tasks = []
    for name, passage in PASSAGES.items():
        tasks += [
            Task(f"{name} summary", "summary", f"Summarize the following text in three sentences.\n\n{passage}"),
            Task(f"{name} quote", "quote", f"{passage}\n\n{QUOTE}"),
            Task(f"{name} edit", "edit", f"{EDIT}\n\n{misspell(passage)}"),
        ]
    return tasks


def chat_prompts() -> list[Task]:
    return [Task(f"chat {i}", "chat", q) for i, q in enumerate(CHAT)]
