"""Word lists for the synthetic default corpus (:mod:`asrkd.data.corpus`).

Written for this project. Everything is lowercase a-z (multi-word names such as "new york" are
fine: the grammar inserts them as separate words). Words are grouped by the slot they fill in the
sentence templates, so that sentences are grammatical even when they are semantically odd.
Inflected forms (plurals, past tense, third person) are derived by :func:`plural` and
:func:`third_person`, with the irregular cases listed here.
"""

from __future__ import annotations


def _words(block: str) -> tuple[str, ...]:
    """Split a whitespace-separated block into a de-duplicated tuple, keeping first order."""
    return tuple(dict.fromkeys(block.split()))


def _pairs(block: str) -> tuple[tuple[str, str], ...]:
    """Parse ``base:past`` items (``base`` alone means a regular ``-ed`` past)."""
    out: dict[str, str] = {}
    for item in block.split():
        base, _, past = item.partition(":")
        out[base] = past or _regular_past(base)
    return tuple(out.items())


def _regular_past(base: str) -> str:
    """Regular past tense; verbs that double their last consonant are listed explicitly."""
    if base.endswith("e"):
        return base + "d"
    if len(base) > 2 and base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ied"
    return base + "ed"


# ---------------------------------------------------------------------------------------------
# Proper nouns
# ---------------------------------------------------------------------------------------------

NAMES = _words("""
    aaron abigail adam adrian aiden alan albert alex alexander alice alicia alison amanda amber
    amelia amy andrea andrew angela anna anne annie anthony arthur ashley audrey austin barbara
    barry ben benjamin bernard beth betty beverly bill billy blake bob bonnie brad brandon brenda
    brian bridget brittany brooke bruce bryan caleb cameron carl carla carlos carmen carol
    caroline carter catherine cecilia charles charlie charlotte chloe chris christina christine
    christopher claire clara colin connor craig cynthia daisy dale daniel danny darren david dean
    deborah dennis derek diana diane dominic donald donna doris dorothy douglas dylan edgar edith
    edward eileen elaine eleanor elijah elizabeth ella ellen emily emma eric erica ethan eugene
    eva evan evelyn felix fiona frank frederick gabriel gary george georgia gerald gina gloria
    gordon grace graham grant greg hannah harold harriet harry hazel heather helen henry holly
    howard hugh ian irene isaac isabel isla ivan jack jackson jacob jake james jamie jane janet
    jasmine jason jean jeffrey jennifer jeremy jessica jill joan joe joel john jonathan jordan
    joseph joshua joyce judith judy julia julian julie justin karen kate katherine kathleen katie
    keith kelly kenneth kevin kim kyle laura lauren lawrence leah leo leonard leslie lewis liam
    lily linda lisa logan louis louise lucas lucy luke lydia madison maggie marcus margaret maria
    marie marilyn mark martha martin mary matthew maureen max megan melissa mia michael michelle
    mike molly monica nancy naomi natalie nathan neil nicholas nicole noah nora norman oliver
    olivia oscar owen pamela patricia patrick paul paula peter philip phoebe rachel ralph raymond
    rebecca richard rita robert robin roger ronald rose ruby russell ruth ryan sally samantha
    samuel sandra sarah scott sean sharon shirley simon sophia sophie stanley stella stephanie
    stephen steve stuart susan sylvia tara teresa theo thomas timothy tina todd tom tony tracy
    trevor tyler valerie vanessa victor victoria vincent violet walter wayne wendy william willow
    zachary zoe
""")

PLACES = _words("""
    london paris berlin madrid rome vienna prague dublin lisbon athens oslo stockholm helsinki
    warsaw budapest amsterdam brussels geneva zurich munich hamburg milan naples venice florence
    barcelona seville manchester liverpool birmingham leeds glasgow edinburgh cardiff belfast
    bristol oxford cambridge york brighton boston chicago denver dallas houston austin seattle
    portland atlanta miami phoenix detroit memphis nashville orlando toronto vancouver montreal
    ottawa calgary sydney melbourne perth brisbane adelaide auckland wellington tokyo kyoto osaka
    beijing shanghai seoul singapore bangkok manila jakarta delhi mumbai cairo nairobi lagos accra
    casablanca lima santiago bogota havana jamaica barbados trinidad mexico brazil argentina chile
    peru canada france germany spain italy portugal greece norway sweden finland denmark poland
    ireland scotland wales england holland belgium austria switzerland russia china japan india
    egypt kenya morocco australia iceland texas florida georgia virginia ohio michigan oregon
    nevada utah montana alaska hawaii kansas kentucky vermont maine arizona colorado california
    africa europe asia america
""")
MULTIWORD_PLACES = (
    "new york", "los angeles", "san francisco", "new orleans", "las vegas", "salt lake city",
    "hong kong", "cape town", "buenos aires", "rio de janeiro", "new zealand", "south africa",
    "new jersey", "north carolina", "the united states", "the lake district", "the highlands",
)  # fmt: skip

WEEKDAYS = _words("monday tuesday wednesday thursday friday saturday sunday")
MONTHS = _words(
    "january february march april may june july august september october november december"
)
SEASONS = _words("spring summer autumn winter")

# ---------------------------------------------------------------------------------------------
# Nouns (countable; plural forms are derived)
# ---------------------------------------------------------------------------------------------

PEOPLE = _words("""
    teacher doctor nurse farmer baker driver pilot sailor soldier student child girl boy woman
    man lady gentleman neighbour friend cousin uncle aunt brother sister mother father daughter
    son grandmother grandfather baby stranger visitor guest tourist traveller passenger customer
    waiter waitress cook chef artist painter singer dancer musician writer poet author reporter
    editor lawyer judge officer detective guard captain king queen prince princess engineer
    scientist professor pupil coach player runner swimmer climber hunter fisherman gardener
    builder carpenter plumber mechanic tailor butcher grocer banker clerk manager director
    secretary nurse dentist surgeon vet shepherd miner porter servant host hostess actor actress
    judge mayor president minister priest monk pirate knight wizard giant robot thief hero
    villain partner colleague assistant volunteer athlete champion leader member owner tenant
    landlord librarian photographer designer architect firefighter postman plumber
""")

ANIMALS = _words("""
    dog cat horse cow pig sheep goat chicken duck goose turkey rabbit mouse rat hamster squirrel
    fox wolf bear deer moose elk lion tiger leopard cheetah panther jaguar zebra giraffe
    elephant rhino hippo camel llama donkey mule monkey gorilla chimp kangaroo koala panda
    otter beaver badger hedgehog mole bat owl eagle hawk falcon crow raven pigeon parrot robin
    sparrow swallow seagull swan penguin pelican flamingo peacock ostrich frog toad snake lizard
    turtle tortoise crocodile alligator dolphin whale shark seal walrus octopus crab lobster
    shrimp oyster jellyfish fish salmon trout goldfish butterfly moth bee wasp ant beetle spider
    snail worm ladybird dragonfly grasshopper mosquito puppy kitten lamb calf foal pony bull
    buffalo bison hare weasel raccoon skunk beetle
""")

FOODS = _words("""
    apple banana orange pear peach plum cherry grape lemon lime melon mango pineapple coconut
    strawberry raspberry blueberry apricot kiwi tomato potato carrot onion cucumber pepper
    pumpkin cabbage lettuce mushroom bean pea radish turnip beetroot sandwich burger pizza pie
    cake cookie biscuit muffin doughnut pancake waffle sausage egg omelette noodle dumpling taco
    pretzel croissant bagel cupcake sweet lollipop candle nut almond peanut walnut olive onion
    chocolate sundae pudding salad soup steak chop roll bun loaf scone tart carrot snack meal
    dinner lunch breakfast picnic feast
""")

OBJECTS = _words("""
    table chair sofa couch bed desk lamp mirror clock window door wall floor ceiling roof stair
    carpet curtain pillow blanket sheet towel basket bucket box bag suitcase backpack wallet
    purse key lock coin ticket letter card envelope stamp parcel package book notebook diary
    magazine newspaper map globe picture painting photo poster frame vase bowl plate cup mug
    glass bottle jar jug kettle teapot pan pot oven stove fridge freezer sink tap spoon fork
    knife spatula tray napkin candle match lighter torch battery radio television computer
    laptop tablet phone camera printer keyboard screen speaker microphone headphone cable wire
    plug switch button remote charger clock watch ring necklace bracelet earring brooch crown
    hat cap helmet scarf glove mitten coat jacket sweater jumper shirt blouse dress skirt
    trouser sock shoe boot sandal slipper belt tie pocket umbrella raincoat apron uniform
    costume mask badge ribbon flag banner sign rope chain ladder hammer nail screw spanner drill
    saw axe shovel spade rake hose wheelbarrow bicycle tricycle scooter skateboard car truck van
    bus coach taxi train tram subway boat ship yacht canoe kayak raft submarine plane jet
    helicopter rocket balloon kite wagon cart tractor trailer engine wheel tyre motor pedal
    brake anchor sail oar compass telescope microscope magnet mirror pencil pen crayon marker
    brush paint canvas easel eraser ruler stapler folder envelope calendar guitar piano violin
    cello flute trumpet drum harp banjo trombone saxophone clarinet tambourine whistle bell
    ball bat racket puzzle doll toy teddy game dice kite marble trophy medal prize gift present
    candle lantern fountain statue bench fence gate hedge pond pool tent hut cabin cottage
    castle tower bridge tunnel road path lane street avenue highway railway platform harbour
    island mountain hill valley river stream lake ocean beach cliff cave desert forest jungle
    field meadow garden farm orchard barn stable shed garage cellar attic kitchen bathroom
    bedroom hallway balcony porch yard chimney fireplace staircase elevator escalator tree bush
    flower rose tulip daisy lily sunflower leaf branch root seed acorn pebble rock stone brick
    shell feather nest egg cloud star planet moon comet storm rainbow snowflake puddle wave
    shadow
""")

LOCATIONS = _words("""
    park station library museum school college university hospital clinic pharmacy bakery
    butcher market supermarket shop store mall cinema theatre gallery restaurant cafe pub bar
    hotel motel airport harbour port office factory warehouse bank church chapel temple
    cathedral stadium gym pool beach zoo aquarium playground farm castle palace prison court
    embassy village town city square plaza corner bridge tunnel garden forest lake river
    mountain valley island
""")

ABSTRACT = _words("""
    idea plan story question answer problem solution reason secret promise dream wish choice
    decision mistake lesson rule habit hobby job task project meeting party wedding concert
    festival holiday journey trip adventure accident surprise joke riddle song poem message
    signal rumour report review plan recipe letter list schedule budget deal bargain contract
    offer order request complaint apology excuse argument discussion conversation interview
    speech lecture exam test score goal record result prize reward chance risk danger warning
    opinion belief theory experiment discovery invention method pattern habit memory moment
    minute hour day week month year decade century morning afternoon evening night weekend
""")

NOUNS: tuple[str, ...] = tuple(
    dict.fromkeys(PEOPLE + ANIMALS + FOODS + OBJECTS + LOCATIONS + ABSTRACT)
)

_IRREGULAR_PLURALS = {
    "child": "children", "man": "men", "woman": "women", "gentleman": "gentlemen",
    "fisherman": "fishermen", "postman": "postmen", "mouse": "mice", "goose": "geese",
    "tooth": "teeth", "foot": "feet", "sheep": "sheep", "deer": "deer", "fish": "fish",
    "moose": "moose", "elk": "elk", "salmon": "salmon", "trout": "trout", "bison": "bison",
    "buffalo": "buffaloes", "knife": "knives", "wife": "wives", "leaf": "leaves",
    "wolf": "wolves", "loaf": "loaves", "shelf": "shelves", "calf": "calves", "half": "halves",
    "thief": "thieves", "life": "lives", "scarf": "scarves", "potato": "potatoes",
    "tomato": "tomatoes",
    "hero": "heroes", "echo": "echoes", "person": "people", "hippo": "hippos",
    "piano": "pianos", "photo": "photos", "cello": "cellos", "banjo": "banjos",
    "mango": "mangoes", "volcano": "volcanoes", "taco": "tacos", "radio": "radios",
    "studio": "studios", "zoo": "zoos", "kangaroo": "kangaroos", "mosquito": "mosquitoes",
    "flamingo": "flamingos", "casino": "casinos",
}  # fmt: skip


def plural(noun: str) -> str:
    """English plural of a countable noun."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if len(noun) > 2 and noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


# ---------------------------------------------------------------------------------------------
# Verbs: (base, past). Transitive ones take a noun object, intransitive ones do not.
# ---------------------------------------------------------------------------------------------

TRANSITIVE_VERBS = _pairs("""
    accept admire adopt answer arrange attack avoid bake borrow build:built burn buy:bought
    call carry catch:caught chase check choose:chose clean climb collect colour cook copy count
    cover cross cut:cut deliver describe design destroy discover draw:drew drink:drank drive:drove
    drop:dropped eat:ate enjoy explore feed:fed fetch fill find:found fix fold follow forget:forgot
    frighten grab:grabbed greet grow:grew guard hang:hung hate hear:heard help hide:hid hit:hit
    hold:held hug:hugged hunt ignore imagine inspect invite join keep:kept kick kiss knit:knitted
    label lead:led lend:lent lift like load lose:lost love make:made mend miss move need notice
    open order organise pack paint park pass photograph pick place plant play polish pour
    prefer:preferred prepare print protect pull push reach read:read receive recognise remember
    repair replace
    rescue return ride:rode ring:rang roll rub:rubbed sell:sold send:sent serve sew share shut:shut
    sign sing:sang smell sort spill:spilt spot:spotted squeeze steal:stole stir:stirred stop:stopped
    study support surprise take:took taste teach:taught tear:tore test thank throw:threw tidy touch
    trace train trust unlock unpack use visit wake:woke want wash watch wear:wore weigh win:won
    wipe wrap:wrapped write:wrote bring:brought leave:left meet:met see:saw find:found show
    shake:shook sweep:swept lock measure inspect decorate examine fry juggle kneel:knelt mix
    notice observe offer pat:patted peel pinch plug:plugged point:pointed praise present punch
    question record rinse rob:robbed rock sketch slice spray stack steer stretch sweeten swing:swung
    tickle toast tow trap:trapped tug:tugged unwrap:unwrapped warm water whistle wind:wound
""")

INTRANSITIVE_VERBS = _pairs("""
    arrive bark breathe cough cry dance disappear doze dream fall:fell float fly:flew frown
    giggle glow hesitate hop:hopped hurry jog:jogged jump knock laugh lie:lay listen march
    nod:nodded pause pray rest run:ran rush shiver shout sigh sing:sang sit:sat skate ski
    sleep:slept slip:slipped smile sneeze snore speak:spoke stand:stood stare stay stumble
    swim:swam talk
    travel:travelled tremble vanish wait wander whisper win:won work worry yawn yell complain
    wink:winked agree apologise blink:blinked cheer clap:clapped crawl disagree faint grumble
    howl kneel:knelt limp listen mumble panic:panicked paddle:paddled relax retire scream sail
    shrug:shrugged sparkle splash squeak struggle succeed sweat:sweated tiptoe wave whine
""")

_IRREGULAR_THIRD_PERSON = {"do": "does", "go": "goes", "have": "has", "be": "is"}


def third_person(verb: str) -> str:
    """Third person singular present ("she runs", "he watches", "it carries")."""
    if verb in _IRREGULAR_THIRD_PERSON:
        return _IRREGULAR_THIRD_PERSON[verb]
    if verb.endswith(("s", "x", "z", "ch", "sh")):
        return verb + "es"
    if len(verb) > 2 and verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


# ---------------------------------------------------------------------------------------------
# Modifiers
# ---------------------------------------------------------------------------------------------

ADJECTIVES = _words("""
    big small tiny huge large little tall short long wide narrow thick thin heavy light deep
    shallow high low round square flat sharp blunt smooth rough soft hard warm cold cool hot
    freezing wet dry damp clean dirty tidy messy new old young ancient modern fresh stale ripe
    rotten sweet sour bitter salty spicy tasty delicious bland crispy crunchy juicy creamy
    red orange yellow green blue purple pink brown black white grey golden silver bronze
    bright dark pale shiny dull colourful striped spotted plain fancy simple strange odd
    ordinary unusual rare common famous secret hidden empty full busy quiet loud noisy silent
    calm angry happy sad cheerful gloomy lonely proud shy brave bold timid clever wise foolish
    silly serious funny curious careful careless gentle fierce kind cruel polite rude honest
    friendly grumpy lazy eager nervous anxious relaxed sleepy tired lively energetic patient
    strong weak healthy sick fit slim thirsty hungry rich poor cheap expensive precious
    valuable useful useless broken perfect fragile sturdy solid hollow wooden metal plastic
    glass paper woollen leather cotton silk velvet frozen melted boiled fried roasted baked
    northern southern eastern western distant nearby local foreign rural urban wild tame
    early late quick slow fast gradual sudden beautiful pretty ugly handsome elegant lovely
    charming graceful clumsy awkward neat shabby cosy spacious crowded lonely peaceful
    dangerous safe risky easy difficult simple complex tricky obvious gentle mild harsh bitter
    sunny cloudy rainy windy stormy foggy snowy misty icy humid chilly breezy grand humble
    magnificent modest enormous gigantic miniature mighty massive delicate loyal jolly merry
    wonderful terrible awful excellent marvellous splendid brilliant superb fantastic dreadful
    horrible pleasant nasty decent fair unfair honest generous greedy selfish humble grateful
    mysterious magical ordinary royal noble humble wealthy crooked straight curly wavy fluffy
    furry hairy bald spotless dusty muddy sandy rocky grassy leafy thorny sticky slippery
    glossy sparkling glowing fading blooming growing shrinking rusty tangled twisted
    ancient fragrant smelly noisy cheeky stubborn restless fearless hopeful joyful playful
""")

ADVERBS = _words("""
    quickly slowly quietly loudly carefully carelessly happily sadly angrily calmly gently
    softly suddenly finally eventually immediately quite rather very really almost nearly
    always never often sometimes rarely seldom usually already soon today tonight tomorrow
    yesterday later early late again once twice together alone outside inside upstairs
    downstairs everywhere somewhere nowhere abroad away back home forward politely rudely
    bravely proudly eagerly nervously anxiously patiently lazily busily cheerfully gladly
    honestly kindly warmly coldly neatly tidily badly well hardly barely easily loosely tightly
    secretly openly boldly wisely foolishly silently noisily smoothly roughly brightly
    clearly briefly deeply firmly freely fully greatly highly lightly mostly partly rapidly
    safely simply truly wildly
""")

# ---------------------------------------------------------------------------------------------
# Function words and fixed phrases used by the templates
# ---------------------------------------------------------------------------------------------

SUBJECT_PRONOUNS = ("i", "you", "we", "they", "he", "she")
OBJECT_PRONOUNS = ("me", "you", "us", "them", "him", "her", "it")
POSSESSIVES = ("my", "your", "our", "their", "his", "her", "its")
DETERMINERS = ("the", "a", "this", "that", "every", "some", "another", "one")
PLURAL_DETERMINERS = ("the", "some", "these", "those", "many", "several", "a few", "all the")
PREPOSITIONS = _words("""
    in on under over behind beside near above below inside outside across along around
    between through towards past against beyond
""")
MODALS = ("will", "can", "could", "should", "might", "must", "would", "may")
NEGATED_MODALS = ("won't", "can't", "couldn't", "shouldn't", "wouldn't", "didn't", "don't")
CONJUNCTIONS = ("and", "but", "so", "because", "while", "although", "and then", "until", "before")
TIME_PHRASES = (
    "this morning", "last night", "yesterday", "today", "tonight", "last week", "next week",
    "every day", "at noon", "at midnight", "in the evening", "in the afternoon", "last year",
    "next month", "once a week", "every morning", "right now", "a moment ago",
)  # fmt: skip
SPEECH_VERBS = ("said", "thought", "told me", "believed", "knew", "heard", "wrote", "explained")
QUESTION_WORDS = ("where", "when", "why", "how")
CURRENCIES = ("dollars", "pounds", "euros")
