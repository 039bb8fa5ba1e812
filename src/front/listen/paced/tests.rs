//! The pace rule on arrival schedules (pure), and bodies held to it (paused time).

use http_body_util::{BodyExt, StreamBody};

use super::*;
use crate::gateway::tasks::Tasks;

const S: u64 = 1000;

fn pace(stall_ms: u64, min_rate: u64, window_ms: u64, deadline_ms: u64) -> Pace {
    let ms = Duration::from_millis;
    Pace { stall: ms(stall_ms), min_rate, window: ms(window_ms), deadline: ms(deadline_ms) }
}

/// `n` bytes every `every` ms from 0 to `until` ms (inclusive).
fn steady(n: usize, every: u64, until: u64) -> Arrivals {
    (0..=until / every).map(|k| (k * every, n)).collect()
}

/// Where a body is cut: the time in ms and the cause.
type Cut = Option<(u64, &'static str)>;
/// When (ms) each piece of a body comes, and its size.
type Arrivals = Vec<(u64, usize)>;

/// Where a body that sends `arrivals` (ms, bytes) and then ends at `ends_at` ms (never, if
/// `None`) is cut: the time in ms and the cause.
fn cut(pace: Pace, arrivals: &[(u64, usize)], ends_at: Option<u64>) -> Cut {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut p = Pacer::new(pace, t0);
    let verdict = |p: &Pacer| {
        let due = p.due();
        let kind = match p.verdict(due) {
            SlowBody::Stalled(_) => "stalled",
            SlowBody::TooSlow { .. } => "too slow",
            SlowBody::Overdue(_) => "overdue",
        };
        let ms = ((due - t0).as_secs_f64() * 1000.0).round() as u64;
        Some((ms, kind))
    };
    for &(t, n) in arrivals {
        if p.due() < at(t) {
            assert!(p.received(n, at(t)).is_err(), "bytes after the body was due are refused");
            return verdict(&p);
        }
        p.received(n, at(t)).expect("in time");
    }
    match ends_at {
        Some(e) if p.due() >= at(e) => None,
        _ => verdict(&p),
    }
}

#[test]
fn the_pace_rule() {
    // 1000 bytes/s, a 5 s window, a 30 s stall timeout, a minute in all.
    let p = pace(30 * S, 1000, 5 * S, 60 * S);
    let mut fast_then_trickle = vec![(0, 1_000_000)];
    fast_then_trickle.extend((1..30).map(|k| (k * 2 * S, 1)));
    let cases: Vec<(&str, Pace, Arrivals, Option<u64>, Cut)> = vec![
        ("silent from the start: the window is its grace", p, vec![], None, Some((5 * S, "too slow"))),
        (
            "fast, then a byte every 2 s: early bytes buy one window",
            p,
            fast_then_trickle,
            None,
            Some((5002, "too slow")),
        ),
        ("steady at the rate", p, steady(1000, S, 59 * S), Some(59 * S), None),
        ("bursts within a window", p, steady(4000, 4 * S, 56 * S), Some(57 * S), None),
        (
            "bursts a window apart, on average at the rate",
            p,
            steady(6000, 6 * S, 54 * S),
            None,
            Some((5 * S, "too slow")),
        ),
        (
            "a tenth under the rate falls a window behind within a minute",
            p,
            steady(900, S, 59 * S),
            None,
            Some((41_900, "too slow")),
        ),
        ("fast, but past the deadline", p, steady(100_000, S, 70 * S), None, Some((60 * S, "overdue"))),
        ("stalled, with no rate rule", pace(2 * S, 0, 5 * S, 60 * S), vec![(0, 10)], None, Some((2 * S, "stalled"))),
        (
            "no rate rule: only the deadline",
            pace(2 * S, 0, 5 * S, 60 * S),
            steady(1, S, 99 * S),
            None,
            Some((60 * S, "overdue")),
        ),
        (
            "empty pieces are no progress",
            pace(2 * S, 0, 5 * S, 60 * S),
            vec![(0, 1), (S, 0), (1900, 0)],
            None,
            Some((2 * S, "stalled")),
        ),
    ];
    for (what, pace, arrivals, ends_at, want) in cases {
        assert_eq!(cut(pace, &arrivals, ends_at), want, "{what}");
    }
}

type Chunk = Result<Frame<Bytes>, std::io::Error>;
type Fed = Paced<StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>>;

/// A paced body, and what feeds it.
fn body(pace: Pace) -> (tokio::sync::mpsc::Sender<Chunk>, Fed) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (tx, Paced::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)), pace))
}

fn slow(e: Box<dyn std::error::Error + Send + Sync>) -> SlowBody {
    *e.downcast::<SlowBody>().expect("a SlowBody")
}

/// Reads `b` until its error: the bytes read before it, and the error.
async fn read_until_cut(b: &mut Fed) -> (usize, SlowBody) {
    let mut got = 0;
    loop {
        match b.frame().await.expect("a frame") {
            Ok(f) => got += f.into_data().expect("data").len(),
            Err(e) => return (got, slow(e)),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_body_ends_at_the_stall_timeout() {
    let (tx, mut b) = body(pace(2 * S, 0, 5 * S, 60 * S));
    tx.send(Ok(Frame::data(Bytes::from_static(b"abc")))).await.expect("send");
    let t = Instant::now();
    let (got, e) = read_until_cut(&mut b).await;
    assert_eq!(got, 3);
    assert!(matches!(e, SlowBody::Stalled(_)), "{e}");
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    assert!(b.frame().await.is_none(), "nothing after the error");
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_body_sent_fast_then_trickled_is_cut_a_window_later() {
    let (tx, mut b) = body(pace(30 * S, 100, 5 * S, 600 * S));
    let feeder = Tasks::new().spawn("feeder", async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 100_000])))).await;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let (got, e) = read_until_cut(&mut b).await;
    assert!(matches!(e, SlowBody::TooSlow { .. }), "{e}");
    assert!(e.to_string().contains("too slowly"), "{e}");
    assert!((100_000..100_003).contains(&got), "{got}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(6), "{took:?}");
    drop(feeder);
}

#[tokio::test(start_paused = true)]
async fn a_body_at_the_rate_is_read_whole_and_the_deadline_cuts_an_endless_one() {
    let (tx, b) = body(pace(30 * S, 100, 5 * S, 600 * S));
    let _feeder = Tasks::new().spawn("feeder", async move {
        for _ in 0..100 {
            let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 150])))).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let all = b.collect().await.expect("the whole body").to_bytes();
    assert_eq!(all.len(), 15_000);

    let (tx, mut b) = body(pace(30 * S, 100, 5 * S, 20 * S));
    let _feeder = Tasks::new().spawn("feeder", async move {
        for _ in 0..100 {
            if tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 150])))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let t = Instant::now();
    let (_, e) = read_until_cut(&mut b).await;
    assert!(matches!(e, SlowBody::Overdue(_)), "{e}");
    assert_eq!(t.elapsed(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn the_pace_starts_when_the_body_is_first_read() {
    let (tx, b) = body(pace(2 * S, 100, 5 * S, 10 * S));
    tx.send(Ok(Frame::data(Bytes::from_static(b"{}")))).await.expect("send");
    drop(tx);
    // Longer than every bound before the handler reads: not the client's time.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(b.collect().await.expect("read whole").to_bytes(), "{}");
}
