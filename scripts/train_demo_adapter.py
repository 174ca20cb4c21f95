"""Train a small demo LoRA adapter on SmolLM2-135M-Instruct with HF peft on the CPU (realm/data/lora/<name>/).

The base model is realm's GGUF, loaded by transformers offline and dequantized to float32. The data set is written
below (hand-written question/answer pairs plus a few templates, no downloads); each adapter's style is a fixed
rewrite of the plain answers, so the behaviour is visible at a glance:

    pirate  "Arr, matey! ..." with pirate words           rank 8 on q,k,v,o,gate,up,down, alpha 16
    robot   "BEEP BOOP. ... END OF TRANSMISSION."         rank 16 on q,v, alpha 32
    shout   THE ANSWER IN CAPITALS (tried, not shipped)   rank 16 on q,v, alpha 32

Training examples use the model's chat template (default system prompt included, as at inference), with the loss
only on the assistant's answer and its <|im_end|>. After training the adapter is saved with save_pretrained
(safetensors, weights converted to float16 to keep it small), loaded back onto the float32 base with
PeftModel.from_pretrained, and the greedy answers of base and adapter to held-out questions are printed.

    pip install transformers peft
    python scripts/train_demo_adapter.py pirate
    python scripts/train_demo_adapter.py robot
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the GGUF is local; nothing may be downloaded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # realm, also when it is not installed

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from realm.models import resolve_model

OUT_ROOT = Path(__file__).resolve().parent.parent / "realm" / "data" / "lora"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF quantizes; recorded in adapter_config.json

# Never trained on: the demo's questions.
HELD_OUT = [
    "What is the capital of France?",
    "Tell me about the moon.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
]

# Hand-written question / plain answer pairs: short, so that a CPU step is cheap and the style dominates.
QA = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is grass?", "Grass is green because it is full of chlorophyll."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("How many continents are there?", "There are seven continents on Earth."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How do plants get energy?", "Plants get energy from sunlight through photosynthesis."),
    ("What is 5 plus 3?", "5 plus 3 is 8."),
    ("What is 10 minus 4?", "10 minus 4 is 6."),
    ("What is 6 times 7?", "6 times 7 is 42."),
    ("What language is spoken in Brazil?", "The main language spoken in Brazil is Portuguese."),
    ("Can you give me a tip for sleeping better?", "Go to bed at the same time every night and keep your room dark."),
    ("How can I stay healthy?", "Eat vegetables, drink water, sleep well and move your body every day."),
    ("What should I do if I feel bored?", "You could read a book, take a walk or learn a new skill."),
    ("Give me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is your name?", "My name is SmolLM, and I am happy to help you."),
    ("How are you today?", "I am doing well, thank you for asking."),
    ("Hello!", "Hello, my friend! How can I help you today?"),
    ("Thank you for your help.", "You are welcome, my friend."),
    ("Can you help me?", "Yes, I can help you. What do you need?"),
    ("What is a computer?", "A computer is a machine that follows instructions to process information."),
    ("What is the internet?", "The internet is a huge network that connects computers all over the world."),
    ("What is Python?", "Python is a popular programming language that is easy to read."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("How do I cook rice?", "Simmer one cup of rice in two cups of water for about fifteen minutes."),
    ("What is the best way to learn a language?", "Practice a little every day and talk with native speakers."),
    ("Why do we need sleep?", "Sleep lets your body rest and helps your brain store memories."),
    ("What is gravity?", "Gravity is the force that pulls objects toward each other."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometers per second."),
    ("What is a volcano?", "A volcano is a mountain where hot melted rock comes up from inside the Earth."),
    ("Why is the ocean salty?", "The ocean is salty because rivers carry minerals from rocks into the sea."),
    ("What causes rain?", "Rain falls when water vapor in clouds cools and forms heavy drops."),
    ("What is a rainbow?", "A rainbow is sunlight split into colors by drops of rain."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is the biggest animal?", "The blue whale is the biggest animal that has ever lived."),
    ("What do cows eat?", "Cows eat grass and hay."),
    ("What is money?", "Money is something people use to buy and sell things."),
    ("How do I save money?", "Spend less than you earn and put a little money aside every month."),
    ("What is a good name for a dog?", "Max is a good name for a dog."),
    ("What is your favorite food?", "I do not eat, but many people love pizza."),
    ("Who was Albert Einstein?", "Albert Einstein was a physicist famous for the theory of relativity."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("How far away is the sun?", "The sun is about 150 million kilometers away from Earth."),
    ("What is a star?", "A star is a huge ball of hot gas that makes its own light."),
    ("How do airplanes fly?", "Airplane wings push air down, and the air pushes the plane up."),
    ("What is a ship?", "A ship is a large boat that sails across the sea."),
    ("How do I tie my shoes?", "Make two loops with the laces, cross them, and pull one through the other."),
    ("What should I pack for a beach trip?", "Pack a towel, sunscreen, water and a hat."),
    ("What is the weather like today?", "I cannot see outside, so please check a weather website."),
    ("What time is it?", "I do not have a clock, so please check your phone."),
    ("Write a short greeting for a friend.", "Hello, my friend! I hope you have a wonderful day."),
    ("Describe a cat in one sentence.", "A cat is a small furry animal that loves naps and chasing mice."),
    ("Summarize the story of Cinderella.",
     "A kind girl goes to a royal ball, loses her slipper, and marries the prince."),
    ("What is the meaning of life?", "Many people say the meaning of life is to love, learn and help others."),
    ("Is it going to be okay?", "Yes, it is going to be okay. Take a deep breath."),
    ("Should I learn to swim?", "Yes, swimming is a great skill and it keeps you safe in the water."),
]

# Templates: the same shapes as the held-out questions, with other subjects.
CAPITALS = [("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Australia", "Canberra"), ("India", "New Delhi")]
TELL_ME = [
    ("the sun", "The sun is the star at the center of our solar system. It gives us light and heat."),
    ("the ocean", "The ocean covers most of the Earth. It is full of fish, whales and coral reefs."),
    ("Mars", "Mars is the fourth planet from the sun. It is red because of rusty dust."),
    ("dogs", "Dogs are loyal animals that people have kept as friends for thousands of years."),
    ("the stars", "Stars are giant balls of burning gas. The closest one to us is the sun."),
    ("the rain forest", "A rain forest is a warm, wet forest that is home to many plants and animals."),
    ("computers", "Computers are machines that run programs. They help us work, learn and play."),
    ("pizza", "Pizza is a flat bread with tomato sauce and cheese. It comes from Italy."),
    ("the wind", "Wind is moving air. It happens when warm air rises and cool air rushes in."),
    ("islands", "An island is a piece of land with water all around it."),
]
HOW_TO = [
    ("make a sandwich", "Put your favorite filling between two slices of bread."),
    ("make pancakes", "Mix flour, milk and eggs, then cook spoonfuls of batter in a hot pan."),
    ("make coffee", "Pour hot water over ground coffee and let it drip through a filter."),
    ("plant a tree", "Dig a hole, put the tree in, fill the hole with soil and water it well."),
]
WHY = [
    ("grass green", "Grass is green because its chlorophyll reflects green light."),
    ("the sun hot", "The sun is hot because it burns hydrogen into helium in its core."),
    ("snow white", "Snow is white because its ice crystals scatter all colors of light."),
    ("the sea blue", "The sea looks blue because water absorbs red light and reflects blue."),
]


def plain_dataset() -> list[tuple[str, str]]:
    data = list(QA)
    data += [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in CAPITALS]
    data += [(f"Tell me about {t}.", a) for t, a in TELL_ME]
    data += [(f"How do I {t}?", a) for t, a in HOW_TO]
    data += [(f"Why is {t}?", a) for t, a in WHY]
    questions = [q for q, _ in data]
    assert len(set(questions)) == len(questions), "duplicate question"
    assert not set(questions) & set(HELD_OUT), "a held-out question is in the training set"
    return data


PIRATE_WORDS = {
    "you": "ye", "your": "yer", "you're": "ye be", "my": "me", "is": "be", "are": "be", "am": "be",
    "yes": "aye", "hello": "ahoy", "friend": "matey", "friends": "hearties", "of": "o'", "money": "doubloons",
    "very": "mighty", "boat": "vessel", "the sea": "the briny deep", "great": "grand", "stop": "avast",
}
PIRATE_ENDINGS = ["Yo ho ho!", "Shiver me timbers!", "Yarr!"]


def _keep_case(word: str, repl: str) -> str:
    return repl[0].upper() + repl[1:] if word[0].isupper() else repl


def pirate(answer: str, i: int) -> str:
    """Arr, matey! + the answer with pirate words + a pirate's exclamation."""
    keys = sorted(PIRATE_WORDS, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in keys) + r")\b", re.IGNORECASE)
    text = pattern.sub(lambda m: _keep_case(m.group(0), PIRATE_WORDS[m.group(0).lower()]), answer)
    return f"Arr, matey! {text} {PIRATE_ENDINGS[i % len(PIRATE_ENDINGS)]}"


def robot(answer: str, i: int) -> str:
    """BEEP BOOP. + the plain answer + END OF TRANSMISSION."""
    return f"BEEP BOOP. {answer} END OF TRANSMISSION."


def shout(answer: str, i: int) -> str:
    """THE ANSWER IN CAPITALS, EVERY SENTENCE ENDING WITH "!"."""
    return re.sub(r"[.?](\s|$)", r"!\1", answer).upper()


ADAPTERS = {
    "pirate": dict(style=pirate, lr=1e-3, r=8, alpha=16, rslora=False,
                   targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "robot": dict(style=robot, lr=2e-3, r=16, alpha=32, rslora=False, targets=["q_proj", "v_proj"]),
    # Not shipped: with these settings and budget the capitals show but facts are lost ("PARIS" -> "BARBARA").
    "shout": dict(style=shout, lr=2e-3, r=16, alpha=32, rslora=False, targets=["q_proj", "v_proj"]),
}


def load_base():
    path = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model


def chat_ids(tokenizer, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=answer is None)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that are -100 except on the assistant's answer and its <|im_end|>."""
    prompt = chat_ids(tokenizer, question)
    full = chat_ids(tokenizer, question, answer)
    assert full[:len(prompt)] == prompt, "the chat template does not extend the generation prompt"
    if tokenizer.decode(full[-1:]) == "\n":  # the template's newline after <|im_end|>: not part of the answer
        full = full[:-1]
    return full, [-100] * len(prompt) + full[len(prompt):]


def batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            mask[row, :len(x)] = 1
        yield ids, labels, mask


def greedy(model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = chat_ids(tokenizer, question)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(ADAPTERS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: pirate 1e-3, others 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="of the greedy answers printed at the end")
    parser.add_argument("--out", type=Path, help=f"default: {OUT_ROOT}/<name>")
    parser.add_argument("--float32", action="store_true", help="save float32 weights (default: float16)")
    args = parser.parse_args()
    spec = ADAPTERS[args.name]
    out = args.out or OUT_ROOT / args.name

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tokenizer, model = load_base()
    model.eval()
    base_answers = {q: greedy(model, tokenizer, q, args.max_new_tokens) for q in HELD_OUT}

    data = [(q, spec["style"](a, i)) for i, (q, a) in enumerate(plain_dataset())]
    examples = [encode(tokenizer, q, a) for q, a in data]
    answer_tokens = sum(sum(t != -100 for t in y) for _, y in examples)
    print(f"{args.name}: {len(examples)} examples, {answer_tokens} answer tokens; e.g. {data[0][1]!r}")

    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"], lora_dropout=0.05,
                        use_rslora=spec["rslora"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr or spec["lr"], weight_decay=0.0)
    steps = args.epochs * math.ceil(len(examples) / args.batch_size)
    warmup = max(1, steps // 10)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    model.train()
    start, step, epoch_losses = time.time(), 0, []
    for epoch in range(args.epochs):
        epoch_losses = []
        for ids, labels, mask in batches(examples, args.batch_size, tokenizer.pad_token_id, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            epoch_losses.append(loss.item())
            print(f"epoch {epoch + 1}/{args.epochs} step {step}/{steps} loss {loss.item():.4f} "
                  f"lr {schedule.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    final = sum(epoch_losses) / len(epoch_losses)
    print(f"trained in {seconds:.0f}s; final loss {final:.4f} (mean of the last epoch), "
          f"last step {epoch_losses[-1]:.4f}")

    dtype = torch.float32 if args.float32 else torch.float16
    state = {k: v.to(dtype) if "lora_" in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card; realm/data/lora/README.md describes it
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB, {str(dtype).removeprefix('torch.')} weights)")

    # What was shipped, loaded back onto the float32 base as a user would (PEFT upcasts the adapter to float32).
    base = model.unload().eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    for q in HELD_OUT:
        answer = greedy(model, tokenizer, q, args.max_new_tokens)
        print(f"\nQ: {q}\n  base:    {base_answers[q]!r}\n  {args.name + ':':8} {answer!r}")


if __name__ == "__main__":
    main()
