"""A small English corpus written for lorafleet's demo and test models.

It trains the byte-level BPE tokenizer and, briefly, the demo base model, so that the demo's
continuations read like English. Plain sentences about everyday things; no outside source.
The text is part of the recipe: changing it changes every built model (see assets.RECIPE_VERSION).
"""

from __future__ import annotations

CORPUS = """\
The morning was cold and clear. The sun rose over the hills and the river shone like silver.
In the small town by the river, the baker opened his shop before anyone else was awake.
He made bread, rolls and a sweet cake with apples. The smell of warm bread filled the street.
People came in one by one. They said good morning and asked about the weather.
The baker said that it would rain in the afternoon, because his knee always hurt before rain.

The school stood at the end of the street. Children walked there with their books and their friends.
The teacher wrote a question on the board: what makes the sky blue? A girl raised her hand.
She said that sunlight is made of many colors, and the air scatters blue light more than red light.
The teacher smiled and said that was a very good answer. Then the class read a story about a fox.

The fox lived in the forest near the town. Every night it walked to the farm to look for food.
The farmer had a dog, and the dog did not like the fox. One night the dog barked so loudly
that the whole farm woke up. The fox ran back into the forest and hid under an old tree.
In the morning the farmer found small tracks in the snow and laughed. The fox was clever, he said.

A good meal does not need to be hard to make. Cook some rice in water with a little salt.
Cut an onion, two carrots and a pepper. Warm oil in a pan and cook the onion until it is soft.
Add the carrots and the pepper, then a spoon of tomato paste and a cup of water.
Let it cook for twenty minutes. Serve the vegetables over the rice with fresh herbs on top.
Soup is also simple: water, vegetables, salt and time. A cold day is the best day for soup.

The library was quiet in the afternoon. An old man read a newspaper by the window.
A student wrote notes about the history of the city. The city was built on an island
where two rivers meet. Traders came by boat to sell wool, salt, fish and wine.
Over many years the market grew, and the people built a bridge, a church and a wall.
Today the wall is gone, but the bridge still stands, and people walk across it every day.

Computers follow instructions. A program is a list of instructions written in a language
that the computer can run. A good program is easy to read. It has clear names and short
functions, and each function does one thing. When a program has a bug, the programmer reads
the code, runs small tests and finds the line that is wrong. Then she fixes it and runs the tests again.
A database keeps data in tables. Each table has rows and columns. A query asks the database
for the rows that match a condition, for example all customers who live in the city.

The weather changed after lunch. Dark clouds came from the west and the wind grew strong.
Soon the rain began to fall. People opened their umbrellas and walked faster.
The baker looked out of his window and said, I told you so. The rain fell all afternoon,
and in the evening the clouds moved away. The sky turned orange and then purple.
The first stars came out over the river, and the town grew quiet again.

The sea is large and deep. Ships sail across it carrying food, cars, oil and letters.
A captain must know the wind, the stars and the map. In the old days sailors used the stars
to find their way at night. Today they use radio and satellites, but they still watch the sky.
When a storm comes, the ship rolls from side to side and the waves wash over the deck.
The crew holds on to the ropes and waits for the storm to pass. After the storm the sea is calm.

Music makes people happy. A song has words and a melody. Some songs are fast and some are slow.
The girl from the school played the piano every evening. Her brother played the guitar.
On Sunday the family sang together, and the neighbors opened their windows to listen.
The old man from the library said that music was the best medicine he knew.

Learning a language takes time. You learn new words every day and you practice speaking.
At first it is hard to understand people who speak fast. After a few months it becomes easier.
You begin to think in the new language, and one day you dream in it. Reading helps a lot.
Short stories, newspapers and songs are good places to start. Do not be afraid of mistakes.

Trees grow slowly. A small seed falls on the ground in autumn. In spring it opens and a green
shoot reaches for the light. Each year the tree grows taller and its trunk grows wider.
Birds build nests in its branches and animals sleep in its shade. After a hundred years
the tree is tall and strong, and children climb it on summer days.

The train left the station at nine. It went through fields, small villages and long tunnels.
A woman looked out of the window and watched the cows in the fields. A man read a book.
A child asked his mother how far it was to the city. She said it was two more hours.
The child counted the bridges and the rivers until he fell asleep. When he woke up, they were there.

Good friends help each other. When one is sad, the other listens. When one is happy,
the other is happy too. Friends share food, stories and time. They do not always agree,
but they talk and they forgive. A good friend is like a warm fire on a cold night.
Café au lait, naïve, déjà vu: some English words came from French. Emoji like 🙂 and 🚀 are new words too.
"""
