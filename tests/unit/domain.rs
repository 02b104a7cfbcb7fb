//! Unit tests of the domain model ("high gear" is in unit_handlers.rs): the
//! rules of contract §2 on `Batch` and the `Product` aggregate, and the limits on
//! names. Pure, in memory, no runtime.

use allocation_worker::domain::events::{Allocated, Deallocated, OutOfStock};
use allocation_worker::domain::names::MAX_NAME_LEN;
use allocation_worker::domain::{
    Batch, BatchRef, DomainError, Event, InvalidName, OrderId, OrderLine, Product, Sku,
};
use chrono::NaiveDate;

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

fn bref(s: &str) -> BatchRef {
    BatchRef::parse(s).unwrap()
}

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

fn line(orderid: &str, sku_: &str, qty: u32) -> OrderLine {
    OrderLine {
        orderid: oid(orderid),
        sku: sku(sku_),
        qty,
    }
}

fn today() -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(2024, 3, 1)
}

fn tomorrow() -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(2024, 3, 2)
}

fn later() -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(2024, 4, 15)
}

/// A product with the given batches, added in the order given.
fn product(sku_: &str, batches: &[(&str, u32, Option<NaiveDate>)]) -> Product {
    let mut p = Product::new(sku(sku_));
    for (reference, qty, eta) in batches {
        p.add_batch(bref(reference), *qty, *eta).unwrap();
    }
    p.take_events();
    p
}

fn available(p: &Product, reference: &str) -> i64 {
    p.batch(&bref(reference)).unwrap().available_quantity()
}

fn allocated_orders(p: &Product, reference: &str) -> Vec<String> {
    p.batch(&bref(reference))
        .unwrap()
        .allocations()
        .iter()
        .map(|l| l.orderid.to_string())
        .collect()
}

fn deallocated(orderid: &str, sku_: &str, qty: u32) -> Event {
    Event::Deallocated(Deallocated {
        orderid: oid(orderid),
        sku: sku(sku_),
        qty,
    })
}

// ---------------------------------------------------------------- batches

#[test]
fn allocating_to_a_batch_reduces_the_available_quantity() {
    let mut p = product("SMALL-TABLE", &[("batch-001", 20, today())]);
    p.allocate(line("order-ref", "SMALL-TABLE", 2)).unwrap();
    assert_eq!(available(&p, "batch-001"), 18);
    assert_eq!(p.batch(&bref("batch-001")).unwrap().allocated_quantity(), 2);
}

#[test]
fn can_allocate_if_available_greater_than_required() {
    let batch = Batch::new(bref("batch-001"), sku("ELEGANT-LAMP"), 20, None);
    assert!(batch.can_allocate(&line("order-123", "ELEGANT-LAMP", 2)));
}

#[test]
fn cannot_allocate_if_available_smaller_than_required() {
    let batch = Batch::new(bref("batch-001"), sku("ELEGANT-LAMP"), 2, None);
    assert!(!batch.can_allocate(&line("order-123", "ELEGANT-LAMP", 20)));
}

#[test]
fn can_allocate_if_available_equal_to_required() {
    let batch = Batch::new(bref("batch-001"), sku("ELEGANT-LAMP"), 2, None);
    assert!(batch.can_allocate(&line("order-123", "ELEGANT-LAMP", 2)));
}

#[test]
fn cannot_allocate_if_skus_do_not_match() {
    let batch = Batch::new(bref("batch-001"), sku("UNCOMFORTABLE-CHAIR"), 100, None);
    assert!(!batch.can_allocate(&line("order-123", "EXPENSIVE-TOASTER", 10)));
}

#[test]
fn available_quantity_subtracts_every_allocated_line() {
    let batch = Batch::restore(
        bref("batch-001"),
        sku("LAMP"),
        20,
        None,
        vec![line("o1", "LAMP", 5), line("o2", "LAMP", 7)],
    );
    assert_eq!(batch.allocated_quantity(), 12);
    assert_eq!(batch.available_quantity(), 8);
    assert!(batch.can_allocate(&line("o3", "LAMP", 8)));
    assert!(!batch.can_allocate(&line("o3", "LAMP", 9)));
}

#[test]
fn reducing_batch_quantity_below_allocations_deallocates_a_line() {
    let mut p = product("LAMP", &[("batch-001", 20, None)]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.allocate(line("o2", "LAMP", 10)).unwrap();
    p.take_events();

    assert!(p.change_batch_quantity(&bref("batch-001"), 15));

    assert_eq!(
        p.batch(&bref("batch-001")).unwrap().purchased_quantity(),
        15
    );
    assert_eq!(allocated_orders(&p, "batch-001"), ["o1"]);
    assert_eq!(available(&p, "batch-001"), 5);
    assert_eq!(p.take_events(), [deallocated("o2", "LAMP", 10)]);
}

#[test]
fn raising_batch_quantity_frees_nothing_and_increases_available() {
    let mut p = product("LAMP", &[("batch-001", 20, None)]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.take_events();
    let version = p.version_number();

    assert!(p.change_batch_quantity(&bref("batch-001"), 50));

    assert_eq!(allocated_orders(&p, "batch-001"), ["o1"]);
    assert_eq!(available(&p, "batch-001"), 40);
    assert!(p.take_events().is_empty());
    assert_eq!(p.version_number(), version + 1);
}

// ------------------------------------------------- product: choosing a batch

#[test]
fn prefers_current_stock_batches_to_shipments() {
    let mut p = product(
        "RETRO-CLOCK",
        &[
            ("in-stock-batch", 100, None),
            ("shipment-batch", 100, tomorrow()),
        ],
    );
    p.allocate(line("oref", "RETRO-CLOCK", 10)).unwrap();
    assert_eq!(available(&p, "in-stock-batch"), 90);
    assert_eq!(available(&p, "shipment-batch"), 100);
}

#[test]
fn prefers_warehouse_stock_even_when_created_after_the_shipment() {
    let mut p = product(
        "RETRO-CLOCK",
        &[
            ("shipment-batch", 100, today()),
            ("in-stock-batch", 100, None),
        ],
    );
    let chosen = p.allocate(line("oref", "RETRO-CLOCK", 10)).unwrap();
    assert_eq!(chosen, Some(bref("in-stock-batch")));
}

#[test]
fn prefers_earlier_batches() {
    let mut p = product(
        "MINIMALIST-SPOON",
        &[
            ("slow", 100, later()),
            ("speedy", 100, today()),
            ("normal", 100, tomorrow()),
        ],
    );
    p.allocate(line("order1", "MINIMALIST-SPOON", 10)).unwrap();
    assert_eq!(available(&p, "speedy"), 90);
    assert_eq!(available(&p, "normal"), 100);
    assert_eq!(available(&p, "slow"), 100);
}

#[test]
fn ties_between_equal_etas_go_to_the_batch_created_first() {
    // Refs sort the other way round, so a sort by ref would pick "a-second".
    let mut p = product(
        "SPOON",
        &[
            ("z-first", 100, tomorrow()),
            ("a-second", 100, tomorrow()),
            ("m-third", 100, tomorrow()),
        ],
    );
    assert_eq!(
        p.allocate(line("o1", "SPOON", 10)).unwrap(),
        Some(bref("z-first"))
    );
}

#[test]
fn ties_between_warehouse_batches_go_to_the_batch_created_first() {
    let mut p = product("SPOON", &[("z-first", 100, None), ("a-second", 100, None)]);
    assert_eq!(
        p.allocate(line("o1", "SPOON", 10)).unwrap(),
        Some(bref("z-first"))
    );
}

#[test]
fn skips_batches_that_cannot_take_the_whole_line() {
    let mut p = product(
        "SPOON",
        &[
            ("warehouse", 5, None),
            ("early", 9, today()),
            ("late", 10, later()),
        ],
    );
    assert_eq!(
        p.allocate(line("o1", "SPOON", 10)).unwrap(),
        Some(bref("late"))
    );
    assert_eq!(available(&p, "warehouse"), 5);
    assert_eq!(available(&p, "early"), 9);
    assert_eq!(available(&p, "late"), 0);
}

#[test]
fn a_batch_taken_in_full_and_raised_again_keeps_its_place_in_the_preference() {
    // The choice looks only at batches with something available; a batch
    // taken in full leaves it, and a quantity raise brings it back in its
    // place (earliest created among equal ETAs), not at the end.
    let mut p = product(
        "SPOON",
        &[
            ("first", 10, tomorrow()),
            ("second", 100, tomorrow()),
            ("empty", 0, None),
        ],
    );
    assert_eq!(
        p.allocate(line("o1", "SPOON", 10)).unwrap(),
        Some(bref("first"))
    );
    assert_eq!(
        p.allocate(line("o2", "SPOON", 1)).unwrap(),
        Some(bref("second"))
    );
    assert!(p.change_batch_quantity(&bref("first"), 15));
    assert_eq!(
        p.allocate(line("o3", "SPOON", 5)).unwrap(),
        Some(bref("first"))
    );
    // A warehouse batch created with nothing, raised: preferred to both.
    assert!(p.change_batch_quantity(&bref("empty"), 3));
    assert_eq!(
        p.allocate(line("o4", "SPOON", 3)).unwrap(),
        Some(bref("empty"))
    );
    // Dropped back under what it holds: it frees its line and leaves again.
    assert!(p.change_batch_quantity(&bref("empty"), 0));
    assert_eq!(available(&p, "empty"), 0);
    assert_eq!(
        p.allocate(line("o5", "SPOON", 1)).unwrap(),
        Some(bref("second"))
    );
}

#[test]
fn returns_allocated_batch_ref() {
    let mut p = product(
        "HIGHBROW-POSTER",
        &[
            ("in-stock-batch-ref", 100, None),
            ("shipment-batch-ref", 100, tomorrow()),
        ],
    );
    let chosen = p.allocate(line("oref", "HIGHBROW-POSTER", 10)).unwrap();
    assert_eq!(chosen, Some(bref("in-stock-batch-ref")));
}

#[test]
fn records_allocated_event() {
    let mut p = product("POSTER", &[("b1", 100, None)]);
    p.allocate(line("o1", "POSTER", 10)).unwrap();
    assert_eq!(
        p.take_events(),
        [Event::Allocated(Allocated {
            orderid: oid("o1"),
            sku: sku("POSTER"),
            qty: 10,
            batchref: bref("b1"),
        })]
    );
    assert!(p.take_events().is_empty(), "take_events drains");
}

#[test]
fn records_out_of_stock_event_if_cannot_allocate() {
    let mut p = product("SMALL-FORK", &[("batch1", 10, today())]);
    p.allocate(line("order1", "SMALL-FORK", 10)).unwrap();
    p.take_events();

    let chosen = p.allocate(line("order2", "SMALL-FORK", 1)).unwrap();

    assert_eq!(chosen, None);
    assert_eq!(
        p.take_events(),
        [Event::OutOfStock(OutOfStock {
            sku: sku("SMALL-FORK"),
            orderid: oid("order2"),
            qty: 1,
        })]
    );
}

#[test]
fn out_of_stock_changes_nothing() {
    let mut p = product("FORK", &[("b1", 5, None), ("b2", 5, today())]);
    p.allocate(line("o1", "FORK", 3)).unwrap();
    p.take_events();
    let before = p.clone();

    p.allocate(line("o2", "FORK", 6)).unwrap();

    assert_eq!(p.batches(), before.batches());
    assert_eq!(p.version_number(), before.version_number());
    assert!(p.allocation_of(&oid("o2")).is_none());
}

#[test]
fn refuses_a_line_for_another_sku() {
    let mut p = product("FORK", &[("b1", 5, None)]);
    let err = p.allocate(line("o1", "KNIFE", 1)).unwrap_err();
    assert_eq!(
        err,
        DomainError::WrongSku {
            product_sku: sku("FORK"),
            line_sku: sku("KNIFE"),
        }
    );
    assert_eq!(available(&p, "b1"), 5);
    assert!(p.take_events().is_empty());
}

// ------------------------------------------------ product: duplicate lines

#[test]
fn allocating_an_allocated_line_again_with_same_qty_changes_nothing_and_records_nothing() {
    // The line goes to "ship" (warehouse too small), so the lookup must search
    // every batch, not only the first.
    let mut p = product("LAMP", &[("warehouse", 5, None), ("ship", 20, today())]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.take_events();
    let before = p.clone();

    let chosen = p.allocate(line("o1", "LAMP", 10)).unwrap();

    assert_eq!(chosen, None);
    assert!(p.take_events().is_empty());
    assert_eq!(p, before);
    assert_eq!(available(&p, "ship"), 10);
}

#[test]
fn allocating_an_allocated_line_again_with_another_qty_is_a_duplicate_line() {
    let mut p = product("LAMP", &[("b1", 20, None)]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.take_events();
    let before = p.clone();

    let err = p.allocate(line("o1", "LAMP", 4)).unwrap_err();

    assert_eq!(
        err,
        DomainError::DuplicateLine {
            orderid: oid("o1"),
            sku: sku("LAMP"),
            allocated: 10,
            requested: 4,
        }
    );
    assert!(p.take_events().is_empty());
    assert_eq!(p, before);
}

#[test]
fn a_deallocated_line_can_be_allocated_again() {
    let mut p = product("LAMP", &[("b1", 10, None)]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.change_batch_quantity(&bref("b1"), 0);
    p.change_batch_quantity(&bref("b1"), 10);
    p.take_events();

    assert_eq!(
        p.allocate(line("o1", "LAMP", 10)).unwrap(),
        Some(bref("b1"))
    );
}

// ------------------------------------------------ product: adding batches

#[test]
fn adding_a_batch_keeps_creation_order_and_bumps_version() {
    let mut p = Product::new(sku("LAMP"));
    assert_eq!(p.version_number(), 0);
    p.add_batch(bref("b2"), 10, later()).unwrap();
    p.add_batch(bref("b1"), 20, None).unwrap();

    let refs: Vec<&str> = p.batches().iter().map(|b| b.reference().as_str()).collect();
    assert_eq!(refs, ["b2", "b1"]);
    let b1 = p.batch(&bref("b1")).unwrap();
    assert_eq!(
        (b1.sku(), b1.purchased_quantity(), b1.eta()),
        (&sku("LAMP"), 20, None)
    );
    assert_eq!(p.version_number(), 2);
    assert!(p.take_events().is_empty());
}

#[test]
fn adding_an_identical_batch_again_is_a_no_op() {
    let mut p = product("LAMP", &[("b1", 20, today())]);
    p.allocate(line("o1", "LAMP", 5)).unwrap();
    p.take_events();
    let before = p.clone();

    p.add_batch(bref("b1"), 20, today()).unwrap();

    assert_eq!(p, before);
    assert_eq!(p.version_number(), before.version_number());
    assert_eq!(p.batches().len(), 1);
}

#[test]
fn adding_a_batch_with_an_existing_ref_and_other_qty_is_a_duplicate_batch() {
    let mut p = product("LAMP", &[("b1", 20, today())]);
    let before = p.clone();
    assert_eq!(
        p.add_batch(bref("b1"), 21, today()),
        Err(DomainError::DuplicateBatch(bref("b1")))
    );
    assert_eq!(p, before);
}

#[test]
fn adding_a_batch_with_an_existing_ref_and_other_eta_is_a_duplicate_batch() {
    let mut p = product("LAMP", &[("b1", 20, today())]);
    let before = p.clone();
    for eta in [None, tomorrow()] {
        assert_eq!(
            p.add_batch(bref("b1"), 20, eta),
            Err(DomainError::DuplicateBatch(bref("b1")))
        );
    }
    assert_eq!(p, before);
}

#[test]
fn the_creating_batch_again_after_a_quantity_change_is_a_no_op() {
    let mut p = product("LAMP", &[("b1", 20, today())]);
    p.allocate(line("o1", "LAMP", 5)).unwrap();
    assert!(p.change_batch_quantity(&bref("b1"), 30));
    p.take_events();
    let before = p.clone();

    // The message that created it, delivered again: nothing changes, and
    // the changed quantity stays.
    p.add_batch(bref("b1"), 20, today()).unwrap();

    assert_eq!(p, before);
    assert_eq!(p.batch(&bref("b1")).unwrap().purchased_quantity(), 30);
    assert_eq!(p.batch(&bref("b1")).unwrap().created_quantity(), 20);
}

#[test]
fn a_batch_created_with_its_changed_quantity_is_a_duplicate_batch() {
    let mut p = product("LAMP", &[("b1", 20, today())]);
    assert!(p.change_batch_quantity(&bref("b1"), 30));
    p.take_events();
    let before = p.clone();

    // The current quantity is not the creating message's: another batch.
    assert_eq!(
        p.add_batch(bref("b1"), 30, today()),
        Err(DomainError::DuplicateBatch(bref("b1")))
    );
    assert_eq!(p, before);
}

#[test]
fn a_restored_batch_compares_with_the_quantity_it_was_created_with() {
    let batch = Batch::restore(bref("b1"), sku("LAMP"), 7, today(), vec![]).created_with(20);
    let mut p = Product::restore(sku("LAMP"), 3, vec![batch]);
    let before = p.clone();

    p.add_batch(bref("b1"), 20, today()).unwrap();
    assert_eq!(p, before);
    assert_eq!(
        p.add_batch(bref("b1"), 7, today()),
        Err(DomainError::DuplicateBatch(bref("b1")))
    );
    assert_eq!(p, before);
}

// -------------------------------------------- product: changing a quantity

#[test]
fn quantity_drop_deallocates_most_recent_lines_first_until_available_is_not_negative() {
    let mut p = product("LAMP", &[("b1", 40, None)]);
    for (orderid, qty) in [("o1", 10), ("o2", 10), ("o3", 5), ("o4", 15)] {
        p.allocate(line(orderid, "LAMP", qty)).unwrap();
    }
    p.take_events();

    // 40 -> 17: allocated 40, frees o4 (15) -> 25, o3 (5) -> 20, o2 (10) -> 10.
    p.change_batch_quantity(&bref("b1"), 17);

    assert_eq!(allocated_orders(&p, "b1"), ["o1"]);
    assert_eq!(available(&p, "b1"), 7);
    assert_eq!(
        p.take_events(),
        [
            deallocated("o4", "LAMP", 15),
            deallocated("o3", "LAMP", 5),
            deallocated("o2", "LAMP", 10),
        ]
    );
}

#[test]
fn quantity_drop_frees_only_lines_of_the_changed_batch() {
    let mut p = product("LAMP", &[("b1", 10, None), ("b2", 10, today())]);
    p.allocate(line("o1", "LAMP", 10)).unwrap(); // b1
    p.allocate(line("o2", "LAMP", 10)).unwrap(); // b2, most recent overall
    p.take_events();

    p.change_batch_quantity(&bref("b1"), 0);

    assert!(allocated_orders(&p, "b1").is_empty());
    assert_eq!(allocated_orders(&p, "b2"), ["o2"]);
    assert_eq!(p.take_events(), [deallocated("o1", "LAMP", 10)]);
}

#[test]
fn quantity_drop_that_still_covers_allocations_frees_nothing() {
    let mut p = product("LAMP", &[("b1", 20, None)]);
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    p.take_events();

    p.change_batch_quantity(&bref("b1"), 10);

    assert_eq!(allocated_orders(&p, "b1"), ["o1"]);
    assert_eq!(available(&p, "b1"), 0);
    assert!(p.take_events().is_empty());
}

#[test]
fn changing_quantity_of_an_unknown_batch_returns_false_and_changes_nothing() {
    let mut p = product("LAMP", &[("b1", 20, None)]);
    let before = p.clone();
    assert!(!p.change_batch_quantity(&bref("nope"), 0));
    assert_eq!(p, before);
}

#[test]
fn changing_quantity_to_the_same_value_changes_nothing() {
    let mut p = product("LAMP", &[("b1", 20, None)]);
    p.allocate(line("o1", "LAMP", 20)).unwrap();
    p.take_events();
    let before = p.clone();

    assert!(p.change_batch_quantity(&bref("b1"), 20));

    assert_eq!(p, before);
    assert!(p.take_events().is_empty());
}

// ------------------------------------------------------------- versioning

#[test]
fn increments_version_number_on_allocation() {
    let mut p = product("LAMP", &[("b1", 20, None)]);
    let version = p.version_number();
    p.allocate(line("o1", "LAMP", 1)).unwrap();
    assert_eq!(p.version_number(), version + 1);
    p.allocate(line("o2", "LAMP", 1)).unwrap();
    assert_eq!(p.version_number(), version + 2);
}

#[test]
fn version_number_bumps_on_every_change_and_only_on_changes() {
    let mut p = Product::restore(sku("LAMP"), 7, Vec::new());
    let mut expect = 7;
    let mut check = |p: &Product, changed: bool, what: &str| {
        if changed {
            expect += 1;
        }
        assert_eq!(p.version_number(), expect, "after {what}");
    };

    p.add_batch(bref("b1"), 10, None).unwrap();
    check(&p, true, "new batch");
    p.add_batch(bref("b1"), 10, None).unwrap();
    check(&p, false, "identical batch");
    p.add_batch(bref("b1"), 11, None).unwrap_err();
    check(&p, false, "duplicate batch");
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    check(&p, true, "allocation");
    p.allocate(line("o1", "LAMP", 10)).unwrap();
    check(&p, false, "same line again");
    p.allocate(line("o1", "LAMP", 3)).unwrap_err();
    check(&p, false, "duplicate line");
    p.allocate(line("o2", "LAMP", 1)).unwrap();
    check(&p, false, "out of stock");
    p.change_batch_quantity(&bref("b1"), 10);
    check(&p, false, "same quantity");
    p.change_batch_quantity(&bref("nope"), 3);
    check(&p, false, "unknown batch");
    p.change_batch_quantity(&bref("b1"), 4);
    check(&p, true, "quantity drop with deallocation");
    p.change_batch_quantity(&bref("b1"), 12);
    check(&p, true, "quantity rise");
}

// ------------------------------------------------------------------ names

#[test]
fn names_accept_up_to_255_characters_counting_characters_not_bytes() {
    assert_eq!(MAX_NAME_LEN, 255);
    let ascii = "x".repeat(255);
    let wide = "é".repeat(255); // 510 bytes
    assert_eq!(Sku::parse(ascii.clone()).unwrap().as_str(), ascii);
    assert_eq!(Sku::parse(wide.clone()).unwrap().as_str(), wide);
    assert!(BatchRef::parse(wide.clone()).is_ok());
    assert!(OrderId::parse(wide).is_ok());
}

#[test]
fn names_longer_than_255_characters_are_rejected() {
    let ascii = "x".repeat(256);
    let wide = "é".repeat(256);
    assert_eq!(Sku::parse(ascii.clone()), Err(InvalidName::TooLong(256)));
    assert_eq!(BatchRef::parse(ascii), Err(InvalidName::TooLong(256)));
    assert_eq!(OrderId::parse(wide), Err(InvalidName::TooLong(256)));
}

#[test]
fn empty_names_are_rejected() {
    assert_eq!(Sku::parse(""), Err(InvalidName::Empty));
    assert_eq!(BatchRef::parse(""), Err(InvalidName::Empty));
    assert_eq!(OrderId::parse(""), Err(InvalidName::Empty));
}

#[test]
fn a_one_character_name_is_accepted_as_is() {
    let s = Sku::parse("A").unwrap();
    assert_eq!(s.as_str(), "A");
    assert_eq!(s.to_string(), "A");
}
