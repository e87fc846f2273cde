//! Helpers shared by the `apb` binary's tests.

pub mod server;

/// A needle-in-a-haystack document of `sentences` filler sentences (about 12 tokens each) with
/// "The special magic number is 73914." at 60 % of the way.
pub fn needle_doc(sentences: usize) -> String {
    const FILL: &[&str] = &[
        "The river runs past the old mill and into the valley.",
        "Farmers bring apples and pears to the market every Saturday.",
        "The library on the hill keeps maps from three centuries.",
        "A cold wind came down from the mountains during the night.",
        "Children play football in the park after school.",
        "The bakery opens at six and sells out of bread by noon.",
        "Birds gather on the bridge when the sun goes down.",
        "The museum shows paintings of ships and harbours.",
    ];
    let mut s: Vec<&str> = (0..sentences)
        .map(|i| FILL[(i * 7 + i / 3) % FILL.len()])
        .collect();
    s.insert(sentences * 6 / 10, "The special magic number is 73914.");
    s.join(" ")
}
