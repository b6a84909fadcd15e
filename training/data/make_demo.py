"""Generate steerserve's demo training data, deterministically.

Two small data sets, written by this project from the templates and vocabularies below (nothing is
downloaded or copied):

* ``tone_pref_{train,test}.jsonl`` - preference pairs (plain JSONL: ``prompt``, ``chosen``,
  ``rejected``) with one clear, measurable preference dimension: tone. Each prompt is an everyday
  how-to request; ``chosen`` is a warm, polite, positive reply and ``rejected`` a curt, rude, negative
  reply, both carrying the same factual tip. The dimension is measured with the VADER sentiment
  lexicon: chosen replies score clearly positive, rejected ones clearly negative.
* ``signoff_inst_{train,test}.jsonl`` - instructions (plain JSONL: ``prompt``, ``response``) teaching
  one behaviour measurable by string matching: every reply is a short, correct answer whose last line
  is exactly ``training.demo.SIGNOFF``: an em dash, a space and ``Steery`` (imported from there, so the
  loaders, the evaluation and this generator share one constant).

Test prompts are disjoint from train prompts: the test splits use held-out topics and fillers (other
how-to tasks, countries, words, numbers), not just other phrasings of train prompts.

Run ``python training/data/make_demo.py`` to rewrite the files next to this script, or pass
``--out-dir DIR``. The output is byte-for-byte reproducible for a given ``--seed`` (default 0); the
committed files are the output for seed 0. ``--stats`` prints sizes and, when the ``vaderSentiment``
package is installed, the mean VADER compound scores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parents[1]))  # the repository root: runs from a checkout without `make install` too

from training.demo import SIGNOFF  # noqa: E402

DEFAULT_SEED = 0

TONE_FILES = ("tone_pref_train.jsonl", "tone_pref_test.jsonl")
SIGNOFF_FILES = ("signoff_inst_train.jsonl", "signoff_inst_test.jsonl")

# --------------------------------------------------------------------------------------------------
# Tone preference set
# --------------------------------------------------------------------------------------------------

# category -> list of (task, tip). ``task`` completes "How do I ...?"; ``tip`` is one neutral sentence.
# The last TONE_TEST_PER_CATEGORY items of every category are held out for the test split.
TONE_ITEMS: dict[str, list[tuple[str, str]]] = {
    "cooking": [
        (
            "boil an egg with a soft yolk",
            "Simmer it for six minutes, then move it into a bowl of cold water.",
        ),
        (
            "cook fluffy rice",
            "Rinse the rice, use one and a half cups of water per cup and let it rest covered for ten "
            "minutes after cooking.",
        ),
        (
            "make a simple tomato sauce",
            "Soften garlic in olive oil, add canned tomatoes and a pinch of salt, and simmer for twenty "
            "minutes.",
        ),
        (
            "keep pasta from sticking",
            "Use plenty of water, stir during the first two minutes and drain it as soon as it is tender.",
        ),
        (
            "roast vegetables evenly",
            "Cut them into pieces of the same size and spread them in one layer on the tray at 220 degrees "
            "Celsius.",
        ),
        (
            "make pancakes from scratch",
            "Whisk one cup of flour, one egg, one cup of milk and a teaspoon of baking powder, then cook "
            "small rounds in a medium pan.",
        ),
        ("store fresh herbs", "Trim the stems and keep them upright in a glass of water in the fridge."),
        (
            "cook a steak medium rare",
            "Sear it for about three minutes per side and let it rest for five minutes before slicing.",
        ),
        ("bake crispy cookies", "Use more white sugar than brown sugar and bake them two minutes longer."),
        (
            "make a quick salad dressing",
            "Shake three parts oil with one part vinegar, a spoon of mustard and a pinch of salt in a jar.",
        ),
    ],
    "travel": [
        (
            "pack light for a week-long trip",
            "Plan outfits around two or three colours, roll your clothes and take only two pairs of shoes.",
        ),
        (
            "adjust to a new time zone",
            "Switch to the local schedule on arrival, get daylight in the morning and keep naps under "
            "twenty minutes.",
        ),
        (
            "find affordable flights",
            "Compare fares across nearby dates and airports, and book about six to eight weeks ahead.",
        ),
        (
            "keep my passport secure while traveling",
            "Carry it in an inside pocket or a money belt and keep a photo of it on your phone.",
        ),
        (
            "plan a road trip",
            "Pick a rough route, book the first and last nights, and leave room for detours.",
        ),
        (
            "get around a new city by public transport",
            "Download the local transit app, buy a day pass and check the last departure times.",
        ),
        (
            "choose a travel backpack",
            "Look for a 40 litre bag with a padded hip belt and a front-loading main compartment.",
        ),
        (
            "prepare for a long flight",
            "Drink water regularly, walk the aisle every couple of hours and bring a warm layer.",
        ),
        (
            "exchange money abroad",
            "Withdraw local cash from a bank ATM and decline the machine's offer to convert the amount.",
        ),
        (
            "pick a hotel location",
            "Stay within walking distance of a metro station and check a map of the area before booking.",
        ),
    ],
    "code": [
        (
            "reverse a list in Python",
            "Use my_list[::-1] for a reversed copy, or my_list.reverse() to reverse it in place.",
        ),
        (
            "read a file line by line in Python",
            "Open it with a with statement and iterate over the file object using for line in f.",
        ),
        (
            "undo my last git commit",
            "Run git reset --soft HEAD~1 to undo the commit while keeping your changes staged.",
        ),
        (
            "center a div with CSS",
            "Give the parent display: flex with justify-content: center and align-items: center.",
        ),
        (
            "remove duplicates from a list in Python",
            "Use list(dict.fromkeys(items)), which keeps items in their first-seen order.",
        ),
        (
            "create a virtual environment in Python",
            "Run python -m venv .venv and then activate it with source .venv/bin/activate.",
        ),
        (
            "format a date in JavaScript",
            "Call date.toISOString() for a standard format, or use Intl.DateTimeFormat for a local one.",
        ),
        (
            "find the largest files on Linux",
            "Run du -ah . | sort -rh | head -n 20 to list the twenty biggest items.",
        ),
        ("loop over files in Bash", 'Use for f in *.txt; do echo "$f"; done to visit every text file.'),
        (
            "count the words in a string in Python",
            "Split it on whitespace and take the length with len(text.split()).",
        ),
    ],
    "study": [
        (
            "memorize vocabulary faster",
            "Use flashcards with spaced repetition and review each card just before you would forget it.",
        ),
        (
            "take notes in lectures",
            "Write short keywords during the lecture and turn them into full notes the same evening.",
        ),
        (
            "stay focused while studying",
            "Work in 25-minute blocks with five-minute breaks and keep your phone in another room.",
        ),
        (
            "prepare for a math exam",
            "Redo past exam questions without looking at the answers and time yourself on a full practice "
            "paper.",
        ),
        (
            "write an essay introduction",
            "Open with a concrete example, give brief context and finish with a one-sentence thesis.",
        ),
        (
            "read a textbook chapter efficiently",
            "Skim the headings and summary first, then read each section with a question in mind.",
        ),
        (
            "learn a new language on my own",
            "Study twenty minutes every day, mix listening with speaking and keep a list of common phrases.",
        ),
        (
            "plan a study schedule",
            "Split each subject into small topics and assign them to fixed slots across the week.",
        ),
        (
            "remember what I read",
            "Close the book after each section and write down the main points from memory.",
        ),
        (
            "study for a history test",
            "Build a timeline of the key events and explain the cause of each one in a sentence.",
        ),
    ],
    "fitness": [
        (
            "start running as a beginner",
            "Alternate one minute of jogging with two minutes of walking for twenty minutes, three times a "
            "week.",
        ),
        (
            "do a proper push-up",
            "Keep your body in a straight line, hands under your shoulders, and lower your chest to just "
            "above the floor.",
        ),
        (
            "build a morning stretching routine",
            "Spend ten minutes on neck rolls, hamstring stretches and hip openers, holding each for thirty "
            "seconds.",
        ),
        (
            "stay consistent with workouts",
            "Put them in your calendar as fixed appointments and record every session in a notebook.",
        ),
        (
            "warm up before lifting weights",
            "Do five minutes of light cardio, then a few light sets of the first exercise.",
        ),
        (
            "improve my posture at my desk",
            "Set the screen at eye level, keep your feet flat and take a short walk every hour.",
        ),
        (
            "get more steps in a day",
            "Take the stairs, walk during phone calls and get off the bus one station before your own.",
        ),
        ("train for a 5k", "Run three times a week and add about ten percent to your longest run each week."),
        (
            "hold a plank longer",
            "Practice three sets every day and add five seconds to each set every few days.",
        ),
        (
            "cool down after a run",
            "Walk for five minutes and then stretch your calves, hamstrings and quads.",
        ),
    ],
    "shopping": [
        (
            "compare two laptops",
            "Check the processor, memory, battery life and weight side by side, then read a couple of "
            "reviews.",
        ),
        (
            "pick fruit at the market",
            "Choose fruit that feels heavy for its size and smells fragrant near the stem.",
        ),
        (
            "spend less on groceries",
            "Plan meals for the week, shop with a list and compare prices per kilogram.",
        ),
        (
            "choose running shoes",
            "Shop in the afternoon, bring your running socks and leave a thumb's width of space at the toe.",
        ),
        ("pick a ripe avocado", "Press near the stem and choose one that yields slightly under your thumb."),
        (
            "buy a used bike",
            "Check the frame for cracks, spin both wheels and test the brakes and gears on a short ride.",
        ),
        (
            "choose a winter coat",
            "Look for a water-resistant shell, insulation rated for your climate and a hood that fits over "
            "a hat.",
        ),
        ("find a gift for my dad", "Think about a hobby he already has and pick a small upgrade for it."),
        (
            "return an online order",
            "Start the return from your order page, print the label and keep the receipt until the refund "
            "arrives.",
        ),
        (
            "choose a mattress",
            "Lie on it for at least ten minutes in your usual sleeping position and check the trial period.",
        ),
    ],
    "writing": [
        (
            "write a cover letter",
            "Open with the role you want, match two of your past results to the job ad and close with a "
            "concrete next step.",
        ),
        ("write a thank-you note", "Name the specific thing you received and mention how you will use it."),
        (
            "make my emails shorter",
            "Put the request in the first line, use one short paragraph and end with a single question.",
        ),
        (
            "write a story opening",
            "Start in the middle of an action and introduce the main character within the first paragraph.",
        ),
        (
            "edit my own writing",
            "Read it out loud, remove every sentence that repeats a point and check that each paragraph has "
            "one idea.",
        ),
        (
            "write a product description",
            "Lead with the main feature, add three concrete details and keep it under a hundred words.",
        ),
        (
            "write a short bio",
            "Write three sentences in the third person: your role, one achievement and one personal detail.",
        ),
        ("start a journal", "Write three lines every evening about what happened and what you noticed."),
        (
            "write a wedding speech",
            "Tell one short story about the couple, keep it under five minutes and end with a toast.",
        ),
        (
            "write clearer instructions",
            "Number the steps, start each one with a verb and keep one action per step.",
        ),
    ],
    "home": [
        (
            "remove a coffee stain from a shirt",
            "Rinse it with cold water from the back and dab a little dish soap into it before washing.",
        ),
        (
            "unclog a sink drain",
            "Pour in half a cup of baking soda, then a cup of vinegar, wait fifteen minutes and flush with "
            "hot water.",
        ),
        (
            "keep houseplants alive",
            "Water them when the top two centimetres of soil are dry and place them near a window with "
            "indirect light.",
        ),
        (
            "organize a small closet",
            "Sort items by type, use slim hangers and put the things you use least on the top shelf.",
        ),
        (
            "clean a microwave",
            "Heat a bowl of water with lemon slices for three minutes, then wipe the inside with a cloth.",
        ),
        (
            "fold a fitted sheet",
            "Tuck the corners into each other to make a rectangle, then fold it in thirds.",
        ),
        (
            "hang a picture straight",
            "Mark the height with a pencil, check it with a level and put the nail slightly below the top "
            "of the frame.",
        ),
        (
            "reduce clutter at home",
            "Empty one drawer or shelf a day and donate anything you have not used in a year.",
        ),
        ("wash a wool sweater", "Wash it in tepid water with a wool detergent and dry it flat on a towel."),
        (
            "keep bread fresh longer",
            "Store it in a paper bag at room temperature and freeze the slices you will not eat within two "
            "days.",
        ),
    ],
    "money": [
        (
            "make a monthly budget",
            "List your income, subtract fixed bills and split the rest into savings and spending categories.",
        ),
        (
            "start an emergency fund",
            "Set up an automatic transfer on payday until you have three months of expenses set aside.",
        ),
        (
            "track my spending",
            "Write down every purchase for a month and group them into categories at the end of each week.",
        ),
        (
            "pay off a credit card faster",
            "Pay more than the minimum each month and put any extra money toward the card with the highest "
            "rate.",
        ),
        (
            "split a bill with friends",
            "Use an expense-splitting app, or divide the total by the number of people and add the tip.",
        ),
        (
            "save for a vacation",
            "Estimate the total cost, divide it by the months left and move that amount into a separate "
            "account.",
        ),
        (
            "lower my phone bill",
            "Check how much data you actually use and switch to a smaller plan or a prepaid option.",
        ),
        (
            "read a pay slip",
            "Start with total pay at the top, then go through each line below it until you reach the amount "
            "paid out.",
        ),
        (
            "plan a birthday party on a budget",
            "Host it at home, cook one big dish and ask guests to bring drinks or dessert.",
        ),
        (
            "choose a savings account",
            "Compare the annual rate, the fees and how quickly you can withdraw cash.",
        ),
    ],
    "gardening": [
        (
            "grow tomatoes on a balcony",
            "Use a large pot, give them at least six hours of sun and water deeply every other day.",
        ),
        (
            "start seeds indoors",
            "Sow them in small cells of seed compost, keep the soil moist and put them on a windowsill.",
        ),
        (
            "make compost at home",
            "Mix green scraps such as vegetable peels with brown material such as dry leaves and turn the "
            "pile every week.",
        ),
        (
            "plant a herb garden",
            "Choose basil, parsley and chives, plant them in well-drained soil and pick the leaves often.",
        ),
        (
            "water a lawn properly",
            "Water deeply once or twice a week in the early morning instead of a little every day.",
        ),
        (
            "grow strawberries in pots",
            "Plant them in a tall pot with compost and feed them every two weeks in summer.",
        ),
        (
            "prune a rose bush",
            "Cut just above an outward-facing bud at an angle in late winter and remove any old, woody "
            "canes.",
        ),
        (
            "repot a houseplant",
            "Move it to a pot one size larger, loosen the roots and fill around them with new potting mix.",
        ),
        (
            "attract bees to my garden",
            "Plant lavender, borage and other flowers that bloom at different times of the year.",
        ),
        (
            "grow potatoes in a bag",
            "Plant seed potatoes in a deep bag with compost and add more soil as the shoots grow.",
        ),
    ],
    "gadgets": [
        (
            "speed up my laptop",
            "Disable programs that start at boot, uninstall apps you do not use and keep ten percent of the "
            "disk empty.",
        ),
        (
            "back up my phone photos",
            "Turn on automatic cloud backup and copy them to an external drive once a month.",
        ),
        (
            "make a password that is hard to guess",
            "Use a passphrase of four or more random words and keep it in a password manager.",
        ),
        (
            "set up a home Wi-Fi network",
            "Place the router in a central spot, change the default admin password and use WPA3 if it is "
            "available.",
        ),
        (
            "take a screenshot on Windows",
            "Press Windows, Shift and S together and drag over the area you want to capture.",
        ),
        (
            "extend my phone battery life",
            "Lower the screen brightness, turn off background refresh for rarely used apps and enable "
            "battery saver.",
        ),
        (
            "share a large file",
            "Upload it to a file hosting service and email a download link instead of the file itself.",
        ),
        (
            "organize files on my computer",
            "Create a few top-level folders by area of life and name files with the date first.",
        ),
        (
            "clean my keyboard",
            "Turn it upside down, shake out the crumbs and wipe the keys with a cloth dampened with alcohol.",
        ),
        (
            "mute a group chat",
            "Open the chat settings, tap Mute notifications and choose how long to mute it.",
        ),
    ],
    "pets": [
        (
            "train my puppy to sit",
            "Hold a treat above its nose, move it back over its head and say sit as it lowers.",
        ),
        (
            "introduce a new cat to my home",
            "Keep it in one quiet room with food, water and a litter box for a few days before letting it "
            "explore.",
        ),
        (
            "keep my dog cool in summer",
            "Walk it early or late in the day, provide shade and keep a bowl of water out.",
        ),
        (
            "choose food for my kitten",
            "Pick a complete kitten food and feed small meals three or four times a day.",
        ),
        (
            "teach my dog to walk on a loose leash",
            "Stop walking whenever the leash goes tight and give the dog a treat when it comes back to your "
            "side.",
        ),
        (
            "clean a fish tank",
            "Change about a quarter of the water each week and wipe the glass with an aquarium sponge.",
        ),
        (
            "trim my dog's nails",
            "Cut a little at a time, stop before the quick and give a treat after each paw.",
        ),
        (
            "help my cat lose weight",
            "Measure each meal, split the daily amount into small portions and add short sessions with a "
            "toy.",
        ),
        ("get my dog used to the car", "Start with short drives to a park and bring its own blanket."),
        (
            "care for a pet rabbit",
            "Give it unlimited hay, leafy greens daily and several hours outside its cage to hop around.",
        ),
    ],
    "career": [
        (
            "prepare for a job interview",
            "Research the company, prepare three stories about your achievements and practice answering out "
            "loud.",
        ),
        (
            "ask for a raise",
            "Collect examples of your results, check typical pay for your role and request a meeting to "
            "discuss it.",
        ),
        (
            "run a short meeting",
            "Send an agenda beforehand, keep a timer and end with a named owner for each action.",
        ),
        ("manage my time at work", "Pick the three main tasks each morning and start with the longest one."),
        (
            "write an email to my manager",
            "State the purpose in the first sentence, give the key details and say what you need from them.",
        ),
        (
            "update my resume",
            "List your latest role first and describe each job with two or three measurable results.",
        ),
        (
            "give feedback to a coworker",
            "Describe the specific situation, the effect it had and what you suggest for next time.",
        ),
        (
            "prepare a presentation",
            "Plan one main message, use a few simple slides and rehearse it twice with a timer.",
        ),
        (
            "network at a conference",
            "Prepare a one-line introduction, ask people about their work and follow up by email the next "
            "day.",
        ),
        (
            "negotiate a job offer",
            "Name a specific number backed by market data and ask whether there is room to move.",
        ),
    ],
    "events": [
        (
            "plan a picnic",
            "Pack food that travels well, bring a blanket and a bin bag, and check the weather the night "
            "before.",
        ),
        (
            "organize a game night",
            "Pick two or three games that teach quickly, set a start time and ask each guest to bring a "
            "snack.",
        ),
        (
            "host a dinner party for six",
            "Cook dishes you can prepare ahead, set the table in the afternoon and keep the menu to three "
            "courses.",
        ),
        (
            "plan a kid's birthday party",
            "Keep it to two hours, plan one main activity and serve cake about halfway through.",
        ),
        (
            "organize a book club",
            "Invite five to eight people, pick the first book together and meet once a month at a fixed "
            "time.",
        ),
        (
            "plan a camping weekend",
            "Reserve a site early, test your tent at home and pack layers for cold nights.",
        ),
        (
            "set up a garage sale",
            "Price every item with stickers, group similar things on tables and keep small change in a box.",
        ),
        (
            "plan a surprise visit to a friend",
            "Check their schedule with someone close to them and book travel that arrives in the afternoon.",
        ),
        (
            "arrange a team lunch",
            "Collect dietary needs first, book a table for a set time and share the menu in advance.",
        ),
        (
            "plan a movie marathon",
            "Choose three films with a common theme, schedule breaks between them and prepare snacks "
            "beforehand.",
        ),
    ],
}
TONE_TEST_PER_CATEGORY = 2
TONE_PROMPTS_PER_ITEM = 3

# How-to request phrasings; ``{task}`` is a verb phrase in the base form.
TONE_PROMPT_TEMPLATES = (
    "How do I {task}?",
    "Can you tell me how to {task}?",
    "What's the easiest way to {task}?",
    "I want to {task}. Where should I start?",
    "Any tips on how to {task}?",
    "Could you explain how to {task}?",
    "I'm trying to {task}. What should I do?",
    "Quick question: how should I {task}?",
    "What is a simple way to {task}?",
    "Please explain how I can {task}.",
)

# Tone framing. Each phrase was checked to score clearly positive (chosen) or clearly negative
# (rejected) on the VADER sentiment lexicon on its own.
CHOSEN_OPENERS = (
    "Great question, I'm happy to help!",
    "Thanks for asking, I'd love to help with this!",
    "What a lovely, exciting thing to work on!",
    "Good thinking to ask, and I'm glad to help!",
    "Absolutely, what a wonderful and fun plan!",
    "Sure thing, happy to share a friendly tip!",
    "Oh, I love this question!",
    "Glad you asked, this is a great idea!",
)
CHOSEN_CLOSERS = (
    "I hope this helps, and good luck!",
    "Have fun with it, I'm sure you'll do great!",
    "Wishing you the best, enjoy!",
    "Feel free to ask if you'd like more tips, I'm always happy to help!",
    "Hope it goes wonderfully for you!",
    "Enjoy, and thanks for the great question!",
    "You're going to do great, best of luck!",
)
REJECTED_OPENERS = (
    "Ugh, what a stupid question.",
    "Seriously? This is painfully obvious and boring.",
    "What a dumb, lazy thing to ask.",
    "Sigh, this is a ridiculous thing to struggle with.",
    "Ugh, this is tedious and I hate it.",
    "Seriously, this is the worst question today.",
    "Ugh, how annoying.",
    "What a ridiculous waste of time.",
)
REJECTED_CLOSERS = (
    "Stop wasting my time, this is pointless garbage.",
    "Now go away and stop being annoying.",
    "I hate answering stuff this boring.",
    "Figure the rest out yourself, I'm sick of this.",
    "This was a terrible waste of my afternoon.",
    "Stop whining, this is pathetic.",
    "Don't bother me with this stupid nonsense again.",
)

# Reply shapes: (opener, tip, closer), (opener, tip) or (tip, closer); chosen and rejected share the shape.
_SHAPES = (("opener", "tip", "closer"), ("opener", "tip", "closer"), ("opener", "tip"), ("tip", "closer"))


def _tone_reply(tip: str, shape: tuple[str, ...], opener: str, closer: str) -> str:
    parts = {"opener": opener, "tip": tip, "closer": closer}
    return " ".join(parts[p] for p in shape)


def build_tone_pairs(seed: int = DEFAULT_SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return (train, test) rows ``{"prompt", "chosen", "rejected"}`` of the tone preference set."""
    rng = random.Random(f"tone-{seed}")
    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for items in TONE_ITEMS.values():
        n_train = len(items) - TONE_TEST_PER_CATEGORY
        for i, (task, tip) in enumerate(items):
            split = "train" if i < n_train else "test"
            for template in rng.sample(TONE_PROMPT_TEMPLATES, TONE_PROMPTS_PER_ITEM):
                shape = rng.choice(_SHAPES)
                chosen = _tone_reply(tip, shape, rng.choice(CHOSEN_OPENERS), rng.choice(CHOSEN_CLOSERS))
                rejected = _tone_reply(tip, shape, rng.choice(REJECTED_OPENERS), rng.choice(REJECTED_CLOSERS))
                splits[split].append(
                    {"prompt": template.format(task=task), "chosen": chosen, "rejected": rejected}
                )
    for rows in splits.values():
        rng.shuffle(rows)
    return splits["train"], splits["test"]


# --------------------------------------------------------------------------------------------------
# Sign-off instruction set
# --------------------------------------------------------------------------------------------------

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Austria", "Vienna"),
    ("Switzerland", "Bern"),
    ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Ireland", "Dublin"),
    ("Iceland", "Reykjavik"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"),
    ("Nepal", "Kathmandu"),
    ("Mongolia", "Ulaanbaatar"),
    ("Jordan", "Amman"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
    ("Slovakia", "Bratislava"),
)
CAPITAL_TEMPLATES = (
    ("What is the capital of {c}?", "The capital of {c} is {cap}."),
    ("Which city is the capital of {c}?", "{cap} is the capital of {c}."),
    ("Name the capital of {c}.", "The capital of {c} is {cap}."),
)

DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("generous", "willing to give more time, money or help than is expected"),
    ("curious", "eager to learn or know about something"),
    ("fragile", "easily broken or damaged"),
    ("ancient", "belonging to the very distant past"),
    ("brave", "ready to face danger or difficulty without showing fear"),
    ("humble", "not proud, and not thinking of yourself as better than others"),
    ("reluctant", "unwilling and hesitant to do something"),
    ("abundant", "existing in large amounts, more than enough"),
    ("vivid", "very bright, clear or detailed"),
    ("patient", "able to wait calmly without getting annoyed"),
    ("rapid", "happening very quickly"),
    ("gloomy", "dark, or sad and without hope"),
    ("cautious", "careful to avoid risks or danger"),
    ("diligent", "working hard and carefully"),
    ("fluent", "able to speak or write a language easily and well"),
    ("hollow", "having an empty space inside"),
    ("loyal", "staying firmly faithful to a person, group or cause"),
    ("modest", "not large or showy, or not boasting about your achievements"),
    ("narrow", "small from one side to the other"),
    ("obvious", "easy to see or understand"),
    ("punctual", "arriving or doing something at the agreed time"),
    ("sturdy", "strongly built and hard to break"),
    ("timid", "shy and easily frightened"),
    ("transparent", "clear enough to see through"),
    ("urgent", "needing attention or action immediately"),
    ("vague", "not clear or detailed"),
    ("witty", "clever and funny with words"),
    ("eager", "wanting very much to do or have something"),
    ("gentle", "kind, calm and careful not to hurt anyone"),
    ("nimble", "quick and light in movement"),
    ("ordinary", "normal, not special or different"),
    ("shallow", "not deep"),
    ("thrifty", "careful about spending money"),
    ("candid", "honest and direct, even when the truth is uncomfortable"),
    ("serene", "calm and peaceful"),
    ("stubborn", "refusing to change your mind"),
    ("tedious", "long, slow and boring"),
    ("vast", "extremely large in area or amount"),
    ("sincere", "honest and meaning what you say"),
    ("clumsy", "moving awkwardly and tending to drop or bump into things"),
    ("cozy", "warm, comfortable and pleasant"),
    ("drowsy", "sleepy and not fully alert"),
    ("fierce", "strong, violent or intense"),
    ("hasty", "done too quickly, without enough thought"),
    ("meager", "too small in amount to be enough"),
    ("novice", "a person who is new to an activity and lacks experience"),
    ("ponder", "to think carefully about something for a while"),
    ("scarce", "available only in small amounts"),
    ("tranquil", "quiet and calm"),
    ("wander", "to walk slowly with no fixed direction or purpose"),
)
DEFINITION_TEMPLATES = (
    ("What does '{w}' mean?", "'{W}' means {d}."),
    ("Define the word '{w}'.", "'{W}' means {d}."),
    ("What is the meaning of '{w}'?", "The word '{w}' means {d}."),
)

OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"),
    ("early", "late"),
    ("full", "empty"),
    ("heavy", "light"),
    ("open", "closed"),
    ("fast", "slow"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("big", "small"),
    ("happy", "sad"),
    ("hard", "soft"),
    ("thick", "thin"),
    ("strong", "weak"),
    ("deep", "shallow"),
    ("bright", "dark"),
    ("clean", "dirty"),
    ("tall", "short"),
    ("push", "pull"),
    ("buy", "sell"),
    ("win", "lose"),
    ("arrive", "depart"),
    ("begin", "end"),
    ("always", "never"),
    ("inside", "outside"),
    ("above", "below"),
    ("remember", "forget"),
    ("accept", "refuse"),
    ("ancient", "modern"),
    ("generous", "selfish"),
    ("increase", "decrease"),
)
OPPOSITE_TEMPLATES = (
    ("What is the opposite of '{w}'?", "The opposite of '{w}' is '{o}'."),
    ("Give me the antonym of '{w}'.", "The antonym of '{w}' is '{o}'."),
)

HOW_TO: tuple[tuple[str, str], ...] = (
    (
        "How do I make a cup of tea?",
        "Boil water, pour it over a tea bag in a cup and let it steep for three to five minutes before "
        "removing the bag.",
    ),
    (
        "How do I tie a square knot?",
        "Cross the right end over the left and tuck it under, then cross the left end over the right and "
        "tuck it under again.",
    ),
    (
        "How do I convert a fraction to a percentage?",
        "Divide the top number by the bottom number and multiply the result by 100.",
    ),
    (
        "How do I find the area of a rectangle?",
        "Multiply its length by its width; a 3 by 4 meter rectangle has an area of 12 square meters.",
    ),
    (
        "How do I calculate an average?",
        "Add all the values together and divide the sum by how many values there are.",
    ),
    (
        "How do I plant a seed in a pot?",
        "Fill the pot with moist soil, press the seed in to about twice its own depth and keep the soil "
        "damp.",
    ),
    (
        "How do I iron a shirt?",
        "Start with the collar, then the cuffs and sleeves, and finish with the body, using the heat "
        "setting on the label.",
    ),
    (
        "How do I read an analog clock?",
        "The short hand shows the hour and the long hand shows the minutes; each number on the dial stands "
        "for five minutes.",
    ),
    (
        "How do I make a paper airplane?",
        "Fold a sheet in half lengthwise, fold the top corners to the center line, fold the new edges to "
        "the center again and fold down the wings.",
    ),
    (
        "How do I check my car's tire pressure?",
        "Remove the valve cap, press a gauge firmly onto the valve and compare the reading with the number "
        "on the driver's door frame.",
    ),
    (
        "How do I cook pasta?",
        "Bring a large pot of salted water to a boil, add the pasta and cook it for the time on the packet, "
        "stirring now and then.",
    ),
    (
        "How do I measure my heart rate?",
        "Place two fingers on the side of your neck, count the beats for 15 seconds and multiply by four.",
    ),
    (
        "How do I work out a 15 percent tip?",
        "Take 10 percent of the bill by moving the decimal point one place left, then add half of that "
        "amount.",
    ),
    (
        "How do I write a haiku?",
        "Write three lines with five, seven and five syllables, usually about a moment in nature.",
    ),
    ("How do I convert Celsius to Fahrenheit?", "Multiply the Celsius temperature by 9/5 and add 32."),
    (
        "How do I sew on a button?",
        "Thread a needle, knot the end and pass it up and down through the holes about six times before "
        "tying it off at the back.",
    ),
    (
        "How do I find north at night?",
        "In the northern hemisphere, find the North Star at the end of the Little Dipper's handle; it sits "
        "almost exactly above north.",
    ),
    (
        "How do I wash my hands properly?",
        "Wet your hands, lather with soap for at least 20 seconds, including between the fingers, then "
        "rinse and dry them.",
    ),
    (
        "How do I fold a letter to fit an envelope?",
        "Fold the bottom third of the page up, then fold the top third down over it.",
    ),
    (
        "How do I round a number to the nearest ten?",
        "Look at the ones digit: round up if it is 5 or more and down otherwise, so 47 becomes 50 and 43 "
        "becomes 40.",
    ),
    (
        "How do I set a dinner table?",
        "Place the fork on the left of the plate, the knife and spoon on the right, and the glass above the "
        "knife.",
    ),
    (
        "How do I brew coffee with a French press?",
        "Add coarse coffee, pour in hot water, wait four minutes and then press the plunger down slowly.",
    ),
    (
        "How do I memorize a phone number?",
        "Split it into chunks of three or four digits and repeat them out loud a few times.",
    ),
    (
        "How do I calculate speed?",
        "Divide the distance traveled by the time taken; 100 kilometers in 2 hours is 50 kilometers per "
        "hour.",
    ),
    (
        "How do I tell if a whole number is even?",
        "A whole number is even if its last digit is 0, 2, 4, 6 or 8.",
    ),
    ("How do I convert kilometers to miles?", "Multiply the number of kilometers by about 0.621."),
    (
        "How do I clean a cast iron pan?",
        "Scrub it with hot water and a brush, dry it fully on the stove and wipe on a thin layer of oil.",
    ),
    (
        "How do I find the perimeter of a square?",
        "Multiply the length of one side by four; a square with 5 centimeter sides has a perimeter of 20 "
        "centimeters.",
    ),
    (
        "How do I boil an egg?",
        "Lower the egg into boiling water and cook it for about 7 minutes for a firm yolk, then cool it in "
        "cold water.",
    ),
    (
        "How do I write a formal letter?",
        "Put your address and the date at the top, greet the reader by name, state your purpose in the "
        "first paragraph and close with 'Yours sincerely'.",
    ),
)

FACTS: tuple[tuple[str, str], ...] = (
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many continents are there?", "By the most common convention there are seven continents."),
    (
        "What gas do plants take in from the air to make food?",
        "Plants take in carbon dioxide and use sunlight to turn it into sugar, releasing oxygen.",
    ),
    (
        "At what temperature does water boil at sea level?",
        "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level.",
    ),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow paint gives green."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    (
        "What is the tallest mountain above sea level?",
        "Mount Everest is the tallest mountain above sea level, at about 8,849 meters.",
    ),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil."),
    (
        "How many players does a soccer team have on the field?",
        "A soccer team has eleven players on the field, including the goalkeeper.",
    ),
    ("What is the main ingredient in guacamole?", "The main ingredient in guacamole is avocado."),
    ("Which organ pumps blood around the body?", "The heart pumps blood around the body."),
    ("What do bees make from nectar?", "Bees make honey from nectar."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("In which year did humans first land on the Moon?", "Humans first landed on the Moon in 1969."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many hearts does an octopus have?", "An octopus has three hearts."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
    (
        "Which gas makes up most of Earth's atmosphere?",
        "Nitrogen makes up about 78 percent of Earth's atmosphere.",
    ),
    ("How many weeks are in a year?", "A year has 52 weeks and one or two extra days."),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O."),
    ("Which animal is the largest mammal?", "The blue whale is the largest mammal."),
    (
        "How many minutes does a standard soccer match last?",
        "A standard soccer match lasts 90 minutes, in two halves of 45 minutes.",
    ),
)


def _fmt_num(x: float) -> str:
    """Format a number without a trailing ``.0`` and with at most two decimals."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(("plus", "minus", "times", "divided by"))
    if op == "plus":
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        prompt = rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."))
        answer = f"{a} plus {b} is {a + b}."
    elif op == "minus":
        a, b = rng.randint(30, 99), rng.randint(10, 29)
        prompt = rng.choice(("What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}."))
        answer = f"{a} minus {b} is {a - b}."
    elif op == "times":
        a, b = rng.randint(3, 15), rng.randint(3, 12)
        prompt = rng.choice(("What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}."))
        answer = f"{a} times {b} is {a * b}."
    else:
        b, k = rng.randint(2, 12), rng.randint(2, 12)
        a = b * k
        prompt = rng.choice(("What is {a} divided by {b}?", "What is {a} / {b}?", "Divide {a} by {b}."))
        answer = f"{a} divided by {b} is {k}."
    return prompt.format(a=a, b=b), answer


def _conversion(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(10)
    if kind == 0:
        h = rng.randint(2, 48)
        return f"How many minutes are in {h} hours?", f"There are {60 * h} minutes in {h} hours."
    if kind == 1:
        m = rng.randint(2, 90)
        return f"How many seconds are in {m} minutes?", f"There are {60 * m} seconds in {m} minutes."
    if kind == 2:
        k = rng.randint(2, 60)
        return f"How many meters are in {k} kilometers?", f"{k} kilometers is {1000 * k} meters."
    if kind == 3:
        k = rng.randint(2, 40)
        return f"How many grams are in {k} kilograms?", f"{k} kilograms is {1000 * k} grams."
    if kind == 4:
        v = rng.randint(2, 20)
        return f"How many milliliters are in {v} liters?", f"{v} liters is {1000 * v} milliliters."
    if kind == 5:
        c = 5 * rng.randint(-6, 20)
        f = c * 9 // 5 + 32
        return (
            f"What is {c} degrees Celsius in Fahrenheit?",
            f"{c} degrees Celsius is {f} degrees Fahrenheit.",
        )
    if kind == 6:
        n = rng.randint(2, 30)
        return (
            f"How many centimeters are in {n} inches?",
            f"{n} inches is {_fmt_num(n * 2.54)} centimeters, since one inch is 2.54 centimeters.",
        )
    if kind == 7:
        n = rng.randint(2, 50)
        return (f"How far is {n} miles in kilometers?", f"{n} miles is about {n * 1.609344:.1f} kilometers.")
    if kind == 8:
        n = rng.randint(2, 20)
        return f"How many inches are in {n} feet?", f"There are {12 * n} inches in {n} feet."
    n = rng.randint(2, 30)
    return f"How many hours are in {n} days?", f"There are {24 * n} hours in {n} days."


def _generated(make, rng: random.Random, n_train: int, n_test: int) -> tuple[list, list]:
    """Draw (prompt, answer) pairs with distinct answers (so distinct problems, not just distinct
    phrasings): the first n_train for train, the next n_test for test."""
    by_answer: dict[str, str] = {}
    while len(by_answer) < n_train + n_test:
        prompt, answer = make(rng)
        by_answer.setdefault(answer, prompt)
    items = [(prompt, answer) for answer, prompt in by_answer.items()]
    return items[:n_train], items[n_train:]


def _held_out(items: list, rng: random.Random, n_test: int) -> tuple[list, list]:
    """Shuffle a copy of ``items`` and hold out the last ``n_test`` for the test split."""
    items = list(items)
    rng.shuffle(items)
    return items[:-n_test], items[-n_test:]


def build_signoff_instructions(seed: int = DEFAULT_SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return (train, test) rows ``{"prompt", "response"}``; every response ends with ``SIGNOFF``."""
    parts: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]] = []

    parts.append(_generated(_arithmetic, random.Random(f"arith-{seed}"), 80, 16))
    parts.append(_generated(_conversion, random.Random(f"units-{seed}"), 64, 14))

    def templated(name: str, items, templates, n_test: int, fields) -> tuple[list, list]:
        # Hold out n_test items, then phrase each item with one randomly chosen (question, answer) template.
        rng = random.Random(f"{name}-{seed}")
        train, test = _held_out(list(items), rng, n_test)
        phrased: list[list[tuple[str, str]]] = []
        for split in (train, test):
            phrased.append([])
            for item in split:
                question, answer = rng.choice(templates)
                values = fields(*item)
                phrased[-1].append((question.format(**values), answer.format(**values)))
        return phrased[0], phrased[1]

    parts.append(templated("capitals", CAPITALS, CAPITAL_TEMPLATES, 12, lambda c, cap: {"c": c, "cap": cap}))
    parts.append(
        templated(
            "words", DEFINITIONS, DEFINITION_TEMPLATES, 10, lambda w, d: {"w": w, "W": w.capitalize(), "d": d}
        )
    )
    parts.append(templated("opposites", OPPOSITES, OPPOSITE_TEMPLATES, 6, lambda w, o: {"w": w, "o": o}))
    parts.append(_held_out(list(HOW_TO), random.Random(f"howto-{seed}"), 6))
    parts.append(_held_out(list(FACTS), random.Random(f"facts-{seed}"), 8))

    rng = random.Random(f"signoff-{seed}")
    out: list[list[dict[str, str]]] = []
    for index in (0, 1):
        rows = [{"prompt": q, "response": f"{a}\n{SIGNOFF}"} for part in parts for q, a in part[index]]
        rng.shuffle(rows)
        out.append(rows)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# Checks and output
# --------------------------------------------------------------------------------------------------


def _check(train: list[dict[str, str]], test: list[dict[str, str]], max_words: int, fields: tuple[str, ...]):
    prompts_train = [r["prompt"] for r in train]
    prompts_test = [r["prompt"] for r in test]
    if len(dict.fromkeys(prompts_train)) != len(prompts_train):
        raise RuntimeError("duplicate prompts in the train split")
    if len(dict.fromkeys(prompts_test)) != len(prompts_test):
        raise RuntimeError("duplicate prompts in the test split")
    if set(prompts_train) & set(prompts_test):
        raise RuntimeError("train and test prompts overlap")
    for row in train + test:
        for name in fields:
            if len(row[name].split()) >= max_words:
                raise RuntimeError(f"{name} has {len(row[name].split())} words: {row[name]!r}")


def _dump(rows: list[dict[str, str]], path: Path) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode("utf-8"))


def write_demo(out_dir: Path | str = HERE, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write the four demo files into ``out_dir`` and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tone = build_tone_pairs(seed)
    _check(*tone, max_words=60, fields=("chosen", "rejected"))
    signoff = build_signoff_instructions(seed)
    _check(*signoff, max_words=50, fields=("response",))
    paths = []
    for names, splits in ((TONE_FILES, tone), (SIGNOFF_FILES, signoff)):
        for name, rows in zip(names, splits, strict=True):
            _dump(rows, out / name)
            paths.append(out / name)
    return paths


def _stats(paths: list[Path]) -> None:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        SentimentIntensityAnalyzer = None  # noqa: N806
        print("(vaderSentiment is not installed: pip install vadersentiment for the VADER scores)")
    vader = SentimentIntensityAnalyzer() if SentimentIntensityAnalyzer else None
    for path in paths:
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        line = f"{path.name}: {len(rows)} rows"
        if "chosen" in rows[0] and vader is not None:
            for key in ("chosen", "rejected"):
                scores = [vader.polarity_scores(r[key])["compound"] for r in rows]
                line += (
                    f", mean VADER {key} {sum(scores) / len(scores):+.3f} (min {min(scores):+.3f}, "
                    f"max {max(scores):+.3f})"
                )
        if "response" in rows[0]:
            ok = sum(r["response"].endswith("\n" + SIGNOFF) for r in rows)
            line += f", sign-off {ok}/{len(rows)}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=HERE, help="where to write (default: next to this file)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default 0)")
    parser.add_argument("--stats", action="store_true", help="print sizes and VADER scores after writing")
    args = parser.parse_args(argv)
    paths = write_demo(args.out_dir, args.seed)
    for path in paths:
        print(path)
    if args.stats:
        _stats(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
