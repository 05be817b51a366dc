//! The `fuzz/` targets' properties (tests/props/) on stable, seeded: a short
//! deterministic pass of each in every `cargo test`, so CI checks them
//! without nightly. `scripts/fuzz` runs the same properties unseeded under
//! libFuzzer. Inputs here are built structurally (valid requests and replies,
//! then mutated), which reaches the interesting cases in few rounds.
//!
//! With `NEARCACHE_FUZZ_SEEDS=dir`, the inputs are also written to
//! `dir/<target>/` as a seed corpus for the fuzzer.

mod props;

use props::Rng;

/// Writes `input` as a seed for `target` when NEARCACHE_FUZZ_SEEDS is set.
fn seed(target: &str, n: usize, input: &[u8]) {
    if let Some(dir) = std::env::var_os("NEARCACHE_FUZZ_SEEDS") {
        if n % 20 == 0 && input.len() <= 4096 {
            let dir = std::path::Path::new(&dir).join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{n:05}")), input).unwrap();
        }
    }
}

/// Random small edits: byte flips, insertions (digits, CR, LF, quotes,
/// type bytes), deletions, truncation, duplication of a slice.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    const INSERTS: &[u8] = b"0123456789-+\r\n\"'\\ \t\x0b\x0c\x00*$:%~>|_,#(!=?;.x";
    for _ in 0..rng.below(4) {
        if data.is_empty() {
            data.push(rng.pick(INSERTS));
            continue;
        }
        let at = rng.below(data.len());
        match rng.below(6) {
            0 => data[at] = rng.next() as u8,
            1 | 2 => data.insert(at, rng.pick(INSERTS)),
            3 => {
                data.remove(at);
            }
            4 => data.truncate(at),
            _ => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                let piece = data[at..end].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, piece);
            }
        }
    }
}

fn inline_line(rng: &mut Rng) -> Vec<u8> {
    const PARTS: &[&[u8]] = &[
        b"GET",
        b"set",
        b"k",
        b"\"a b\"",
        b"'c\\'d'",
        b"\"\\x41\\x4a\"",
        b"\"\\x+1\"",
        b"\"\\n\\t\\\\\"",
        b"\"unterminated",
        b"'x'y",
        b"\"q\"r",
        b"\xc3\xa4",
        b"\"\"",
        b"''",
    ];
    const BLANKS: &[&[u8]] = &[b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\r", b" \x0c "];
    let mut line = Vec::new();
    if rng.below(4) == 0 {
        line.extend_from_slice(rng.pick(BLANKS));
    }
    for i in 0..1 + rng.below(4) {
        if i > 0 {
            line.extend_from_slice(rng.pick(BLANKS));
        }
        line.extend_from_slice(rng.pick(PARTS));
    }
    if rng.below(4) == 0 {
        line.extend_from_slice(rng.pick(BLANKS));
    }
    line.extend_from_slice(if rng.below(3) == 0 { b"\n" } else { b"\r\n" });
    line
}

fn request_input(rng: &mut Rng) -> Vec<u8> {
    let mut stream = Vec::new();
    for _ in 0..1 + rng.below(6) {
        match rng.below(5) {
            0 | 1 => {
                let args: Vec<Vec<u8>> = (0..1 + rng.below(5)).map(|_| rng.bytes(20)).collect();
                stream.extend_from_slice(&nearcache::protocol::command(&args));
            }
            2 => stream.extend_from_slice(&inline_line(rng)),
            3 => stream.extend_from_slice(rng.pick(&[
                &b"*0\r\n"[..],
                b"*-1\r\n",
                b"\r\n",
                b"*1\r\n$01\r\nk\r\n",
                b"*01\r\n$1\r\nk\r\n",
                b"*1\r\n$-0\r\n\r\n",
                b"*-0\r\n",
                b"*1\r\n$1\r\nkXY",
                b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            ])),
            _ => stream.extend_from_slice(&rng.bytes(12)),
        }
    }
    if rng.below(2) == 0 {
        mutate(rng, &mut stream);
    }
    let mut input = vec![rng.next() as u8, 0, rng.next() as u8, rng.next() as u8];
    if rng.below(40) == 0 {
        input[1] = 0xff;
    }
    input.extend_from_slice(&stream);
    input
}

#[test]
fn requests() {
    let mut rng = Rng::new(1);
    for n in 0..3000 {
        let input = request_input(&mut rng);
        seed("requests", n, &input);
        props::requests::check(&input);
    }
}

#[test]
fn replies() {
    let mut rng = Rng::new(2);
    for n in 0..3000 {
        let mut stream = Vec::new();
        let resp3 = n % 2 == 0;
        for _ in 0..1 + rng.below(3) {
            props::gen_reply(&mut rng, &mut stream, resp3, 20);
        }
        if rng.below(2) == 0 {
            mutate(&mut rng, &mut stream);
        }
        // Mostly flat; one input in 8 behind a deep prefix, a few of them
        // 10,000 to 65,535 levels deep (the fuzzer goes deeper more often).
        let deep = rng.below(8) == 0;
        let mode = if deep { 1 + rng.below(6) as u8 } else { 0 };
        let depth = match deep {
            false => 0,
            true if rng.below(40) == 0 => 10_000 + rng.below(55_536) as u16,
            true => rng.below(2048) as u16,
        };
        let mut input = vec![mode, rng.next() as u8, rng.next() as u8];
        input.extend_from_slice(&depth.to_be_bytes());
        input.extend_from_slice(&stream);
        seed("replies", n, &input);
        props::replies::check(&input);
    }
}

#[test]
fn command_keys_cover_redis_key_specs() {
    let o = props::commands::oracle();
    assert!(o.getkeys.len() > 1000, "fuzz/keyspecs.json has a corpus");
    let interpreted = props::commands::check_corpus();
    assert!(
        interpreted * 2 > o.getkeys.len(),
        "the key spec interpreter covers only {interpreted} of {} corpus commands",
        o.getkeys.len()
    );
    println!(
        "Redis {}: {} GETKEYSANDFLAGS answers, {interpreted} also interpreted",
        o.redis_version,
        o.getkeys.len()
    );
}

#[test]
fn commands() {
    let mut rng = Rng::new(3);
    for n in 0..10_000 {
        let input = rng.bytes(40);
        seed("commands", n, &input);
        props::commands::check(&input);
    }
}

#[test]
fn routes() {
    let mut rng = Rng::new(4);
    for n in 0..1500 {
        let input = rng.bytes(200);
        seed("routes", n, &input);
        props::routes::check(&input);
    }
}
